//! A throwaway PostgreSQL cluster for tests and benchmarks: Debian's
//! `postgresql` package, `initdb` into a temporary directory, the server on
//! a free loopback port (and a private socket directory), stopped and
//! removed when dropped. Run as the `postgres` user when we are root
//! (the server refuses to run as root).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const USER: &str = "seen";
pub const PASSWORD: &str = "s3cret-for-tests";

pub struct Cluster {
    _dir: tempfile::TempDir,
    data: PathBuf,
    sockets: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    pub port: u16,
    fsync: bool,
    as_postgres: bool,
}

/// The newest `/usr/lib/postgresql/N/bin`, or `SEEN_PG_BIN`.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SEEN_PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (apt-get install postgresql; or set SEEN_PG_BIN)")
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.pop().expect("no /usr/lib/postgresql/N/bin").1
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// A running cluster; `fsync` off makes tests fast, on makes
    /// benchmarks honest.
    pub fn start(fsync: bool) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("seen-pg-")
            .tempdir()
            .unwrap();
        let as_postgres = running_as_root();
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        std::fs::create_dir(&sockets).unwrap();
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        let c = Cluster {
            log: dir.path().join("server.log"),
            _dir: dir,
            data,
            sockets,
            bin: bin_dir(),
            port: free_port(),
            fsync,
            as_postgres,
        };
        if as_postgres {
            // The server runs as `postgres`: it must own what it writes.
            let root = c._dir.path();
            run(Command::new("chmod").arg("755").arg(root));
            run(Command::new("chown").arg("-R").arg("postgres").arg(root));
        }
        c.run_pg(
            "initdb",
            &[
                "-D",
                c.data.to_str().unwrap(),
                "-U",
                USER,
                "--pwfile",
                pwfile.to_str().unwrap(),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        c.start_server();
        c
    }

    /// `tool` of the server's bin directory, run as `postgres` when we are root.
    fn pg_command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.current_dir("/");
        cmd
    }

    fn run_pg(&self, tool: &str, args: &[&str]) -> Output {
        let mut cmd = self.pg_command(tool);
        cmd.args(args);
        let out = cmd.output().unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        out
    }

    /// Start the server (again, after [`Cluster::stop`]).
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync={} -c max_connections=200",
            self.port,
            self.sockets.display(),
            if self.fsync { "on" } else { "off" },
        );
        self.run_pg(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-l",
                self.log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        );
    }

    /// Stop the server at once (connections are cut).
    pub fn stop(&self) {
        self.run_pg("pg_ctl", &self.stop_args());
    }

    fn stop_args(&self) -> [&str; 6] {
        let data = self.data.to_str().unwrap();
        ["-D", data, "-m", "immediate", "-w", "stop"]
    }

    /// A URL for database `db` as the test user.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// Run SQL with psql over the socket directory; its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.sockets)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", USER, "-d", db, "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new empty database.
    pub fn create_db(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_command("pg_ctl").args(self.stop_args()).output();
    }
}

fn run(cmd: &mut Command) {
    let st = cmd.status().unwrap();
    assert!(st.success(), "{cmd:?} failed");
}

fn running_as_root() -> bool {
    // `id -u` rather than libc, so the test needs no extra dependency.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
