//! Child processes that cannot outlive a test, and the per-test watchdog.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines of a log printed when a test fails.
const LOG_TAIL_LINES: usize = 200;

/// Live children by pid: name and log paths, so that the watchdog can report and end them.
fn registry() -> &'static Mutex<HashMap<u32, (String, PathBuf)>> {
    static R: OnceLock<Mutex<HashMap<u32, (String, PathBuf)>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

fn registered() -> Vec<(u32, String, PathBuf)> {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.iter()
        .map(|(pid, (name, log))| (*pid, name.clone(), log.clone()))
        .collect()
}

/// A child process, killed (and reaped) on drop. Its stderr goes to a log file that is
/// printed if the test is failing when the process is dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    stderr: PathBuf,
    stdout: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr in `NAME.stdout` and
    /// `NAME.stderr` under `log_dir`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Proc {
        let stderr = log_dir.join(format!("{name}.stderr"));
        let stdout = log_dir.join(format!("{name}.stdout"));
        let err_file = File::create(&stderr).expect("creating a log file");
        let out_file = File::create(&stdout).expect("creating a log file");
        cmd.stdin(Stdio::null())
            .stdout(out_file)
            .stderr(err_file)
            .env("NO_COLOR", "1");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(child.id(), (name.to_owned(), stderr.clone()));
        Proc {
            name: name.to_owned(),
            child,
            stderr,
            stdout,
            status: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything written to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Sends SIGTERM and waits, up to `limit`, for the process to exit (cleanly, after
    /// whatever it logs on the way out).
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        // A process already reaped no longer owns its pid.
        if self.exited().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
        }
        let status = wait_for("the process to exit after SIGTERM", limit, || self.exited());
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.child.id());
        status
    }

    /// Kills the process with SIGKILL (no clean shutdown) and reaps it.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.child.id());
    }

    /// Resident memory in bytes, from `/proc` (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        self.status_bytes("VmRSS:")
    }

    /// The process's anonymous resident memory (heap and stacks, not its mapped binary),
    /// in bytes.
    pub fn anon_bytes(&self) -> Option<u64> {
        self.status_bytes("RssAnon:")
    }

    /// A size field of `/proc/PID/status` (given in KiB there), in bytes.
    fn status_bytes(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Waits until `pred` holds for the stderr log, the process ends, or `limit` passes.
    /// Returns whether `pred` held.
    pub fn wait_log(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if pred(&self.log()) {
                return true;
            }
            if self.exited().is_some() || Instant::now() >= deadline {
                return pred(&self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Prints the tail of the stderr log, headed by the process name.
    pub fn print_log(&self) {
        print_tail(&self.name, &self.stderr);
        let out = self.stdout();
        if !out.is_empty() {
            eprintln!("---- {} stdout ----\n{}", self.name, out);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            self.print_log();
        }
    }
}

fn print_tail(name: &str, path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
    eprintln!(
        "---- {name} stderr ({} lines, last {}) ----",
        lines.len(),
        lines.len() - skip
    );
    for l in &lines[skip..] {
        eprintln!("{l}");
    }
}

/// Ends the whole test process if the test has not finished in time; disarmed on drop.
#[derive(Debug)]
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
}

/// Arms a watchdog for `test`: after `limit`, the logs of every live child are printed,
/// the children are killed, and the process exits with a message. A hang is a failure,
/// never a stuck run.
///
/// The binaries under test are built first, outside the limit: a cold build is slow and
/// is not the test (the test runner's own timeout still bounds it).
pub fn watchdog(test: &str, limit: Duration) -> Watchdog {
    super::bin::binaries();
    let (tx, rx) = mpsc::channel::<()>();
    let test = test.to_owned();
    std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("e2e watchdog: test {test} did not finish within {limit:?}; aborting");
            for (pid, name, log) in registered() {
                print_tail(&name, &log);
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            std::process::exit(124);
        }
    });
    Watchdog { disarm: Some(tx) }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.disarm.take() {
            let _ = tx.send(());
        }
    }
}

/// Polls `probe` every few milliseconds until it returns `Some`, or panics with `what`
/// after `limit`. A readiness check, never a timed assertion: the limit is generous.
pub fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
