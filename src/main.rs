//! The `seen` command-line tool. See `seen --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
