//! Command-line interface: argument parsing and dispatch.

mod bench;
mod filter;
mod store;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Have I already processed this event? Deduplicates event streams.
#[derive(Parser, Debug)]
#[command(name = "seen", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Copy stdin to stdout, keeping only lines whose id was not seen before.
    Filter(filter::FilterArgs),
    /// Describe a state directory: segments, live keys, expiry range, bytes.
    Inspect(store::StoreArgs),
    /// Check every record of a state directory; exit 1 on any damage,
    /// naming the file and offset.
    Verify(store::StoreArgs),
    /// Measure a durable workload on a scratch state directory.
    Bench(bench::BenchArgs),
}

/// Exit code for bad input under `--on-invalid fail`, and for usage errors.
pub(crate) const EXIT_INVALID_INPUT: u8 = 2;

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Filter(args) => filter::run(args),
        Command::Inspect(args) => store::inspect(args),
        Command::Verify(args) => store::verify(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("seen: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serve `/metrics` for `engine` on `addr` from a background thread.
pub(crate) fn serve_metrics(
    addr: std::net::SocketAddr,
    engine: &std::sync::Arc<seen::Engine>,
) -> Result<(), filter::anyhow_like::Error> {
    let mut registry = prometheus_client::registry::Registry::default();
    seen::metrics::register(&mut registry, engine);
    let server = tiny_http::Server::http(addr)
        .map_err(|e| filter::anyhow_like::Error::msg(format!("metrics address {addr}: {e}")))?;
    std::thread::Builder::new()
        .name("seen-metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let mut body = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
                    let header = tiny_http::Header::from_bytes(
                        "Content-Type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .ok();
                    let mut r = tiny_http::Response::from_string(body);
                    if let Some(h) = header {
                        r.add_header(h);
                    }
                    r
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })
        .map_err(|e| filter::anyhow_like::Error::io("metrics thread", e))?;
    Ok(())
}

/// A progress bar on stderr; hidden when stderr is not a terminal or `quiet`.
pub(crate) fn progress_bar(what: &'static str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} segments ({eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}

/// Parse a TTL: a humantime duration (`90s`, `1h 30m`, `7d`) or bare seconds.
pub(crate) fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "bad duration {s:?}: TTLs have one-second resolution"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_ttl("0").unwrap(), Duration::ZERO);
        assert!(parse_ttl("1.5s").is_err());
        assert!(parse_ttl("soon").is_err());
    }
}
