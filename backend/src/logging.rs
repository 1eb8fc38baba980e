//! Logging with a bound per call site: peers decide how often most lines are logged (a refused
//! connection, a dropped one, a refused region, a request answered EIO), so each place in the
//! code that logs at info level or above may log [`BURST`] lines per [`WINDOW`]; further
//! lines from it are counted, and the count is logged once the window is over ("... N more
//! suppressed"). Debug and trace lines pass unchanged: they are off unless asked for.
//!
//! Written here rather than taken from a crate: the rate-limiting crates (`governor` and the
//! like) bound calls but do not report what they dropped, and the per-site summary is the
//! part an operator needs; this is a map and a counter around `env_logger`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use log::{Level, Log, Metadata, Record};

/// How log lines are written on standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `[2026-01-01T00:00:00Z INFO  coco_sidecar::serve::server] message`, for people (and journald,
    /// which adds its own time stamp and keeps the line).
    #[default]
    Text,
    /// One JSON object per line, `{"ts":"2026-01-01T00:00:00.123Z","level":"INFO",
    /// "target":"coco_sidecar::serve::server","msg":"..."}`, for log collectors (journald's JSON
    /// export, Kubernetes log pipelines) that parse fields instead of text.
    Json,
}

/// Writes one record as a JSON object on one line (serde_json escapes newlines in messages).
fn write_json(buf: &mut impl Write, record: &Record<'_>) -> std::io::Result<()> {
    let line = serde_json::json!({
        "ts": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "level": record.level().as_str(),
        "target": record.target(),
        "msg": record.args().to_string(),
    });
    writeln!(buf, "{line}")
}

/// Installs the process's logger: `env_logger` (`RUST_LOG`, `default_level` without it) in
/// `format`, behind [`RateLimited`].
pub fn init(default_level: &str, format: Format) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level));
    if format == Format::Json {
        builder.format(write_json);
    }
    let logger = builder.build();
    log::set_max_level(logger.filter());
    // Peers decide how often most lines are logged: each call site gets a bounded rate.
    let _ = log::set_boxed_logger(Box::new(RateLimited::new(logger)));
}

/// Lines one call site may log per window.
pub const BURST: u32 = 20;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Site {
    started: Instant,
    logged: u32,
    suppressed: u64,
    level: Level,
    target: String,
}

/// A logger that passes at most [`BURST`] lines per [`WINDOW`] of each call site to `inner`.
#[derive(Debug)]
pub struct RateLimited<L> {
    inner: L,
    sites: Mutex<HashMap<(&'static str, u32), Site>>,
}

impl<L: Log> RateLimited<L> {
    /// Limits `inner`.
    pub fn new(inner: L) -> RateLimited<L> {
        RateLimited {
            inner,
            sites: Mutex::new(HashMap::new()),
        }
    }

    fn summary(&self, (file, line): (&'static str, u32), site: &Site) {
        self.inner.log(
            &Record::builder()
                .level(site.level)
                .target(&site.target)
                .args(format_args!(
                    "{} more lines from {file}:{line} suppressed in {} s (at most {BURST} per \
                     {} s)",
                    site.suppressed,
                    site.started.elapsed().as_secs(),
                    WINDOW.as_secs()
                ))
                .build(),
        );
    }
}

impl<L: Log> Log for RateLimited<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        if record.level() > Level::Info {
            self.inner.log(record);
            return;
        }
        let key = (
            record
                .file_static()
                .or(record.module_path_static())
                .unwrap_or(""),
            record.line().unwrap_or(0),
        );
        let now = Instant::now();
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        // Windows that ended with lines suppressed, this site's included, report them first.
        for (k, site) in sites.iter_mut() {
            if now.duration_since(site.started) >= WINDOW {
                if site.suppressed > 0 {
                    self.summary(*k, site);
                }
                site.started = now;
                site.logged = 0;
                site.suppressed = 0;
            }
        }
        let site = sites.entry(key).or_insert_with(|| Site {
            started: now,
            logged: 0,
            suppressed: 0,
            level: record.level(),
            target: record.target().to_owned(),
        });
        if site.logged < BURST {
            site.logged += 1;
            drop(sites);
            self.inner.log(record);
        } else {
            site.suppressed += 1;
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Collects the lines it is given.
    #[derive(Debug, Default, Clone)]
    struct Lines(Arc<Mutex<Vec<String>>>);

    impl Log for Lines {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &Record<'_>) {
            self.0.lock().expect("lock").push(record.args().to_string());
        }
        fn flush(&self) {}
    }

    fn record(level: Level, line: u32, f: impl FnOnce(&Record<'_>)) {
        f(&Record::builder()
            .level(level)
            .file_static(Some("src/x.rs"))
            .line(Some(line))
            .args(format_args!("line {line}"))
            .build());
    }

    #[test]
    fn json_lines_are_one_object_each_with_the_message_escaped() {
        let mut out = Vec::new();
        write_json(
            &mut out,
            &Record::builder()
                .level(Level::Warn)
                .target("coco_sidecar::daemon::monitor")
                .args(format_args!("two\nlines \"quoted\""))
                .build(),
        )
        .expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["target"], "coco_sidecar::daemon::monitor");
        assert_eq!(v["msg"], "two\nlines \"quoted\"");
        let ts = v["ts"].as_str().expect("ts");
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
    }

    #[test]
    fn each_site_logs_its_burst_and_the_rest_is_counted_in_a_summary() {
        let lines = Lines::default();
        let limited = RateLimited::new(lines.clone());
        for _ in 0..BURST + 30 {
            record(Level::Warn, 1, |r| limited.log(r));
            record(Level::Debug, 2, |r| limited.log(r));
        }
        record(Level::Info, 3, |r| limited.log(r));
        let got = lines.0.lock().expect("lock").clone();
        let from = |line: &str| got.iter().filter(|l| *l == line).count();
        assert_eq!(from("line 1"), BURST as usize, "the burst, then silence");
        assert_eq!(from("line 2"), BURST as usize + 30, "debug is not limited");
        assert_eq!(from("line 3"), 1, "another site has its own budget");
        // The window is over: the next line from any site first reports the 30 suppressed.
        let mut sites = limited.sites.lock().expect("lock");
        for site in sites.values_mut() {
            site.started -= WINDOW;
        }
        drop(sites);
        record(Level::Info, 3, |r| limited.log(r));
        let got = lines.0.lock().expect("lock").clone();
        assert!(
            got.iter()
                .any(|l| l.starts_with("30 more lines from src/x.rs:1 suppressed")),
            "{got:?}"
        );
    }
}
