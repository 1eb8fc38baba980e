//! The blob as an operator sees it: judged when `serve` starts and again within a second of
//! every change, with one log line each time (what it is, or what is wrong and what to do), and
//! the `coco_sidecar_blob_valid` / `..._vek_not_after_timestamp_seconds` gauges.
//!
//! Requests do not depend on any of this: they validate the blob themselves
//! ([`crate::blob`]). The monitor only makes a mistake visible at once, not when guests fail:
//! at start a `--certs` that cannot be a blob (a directory, an unreadable path, a file that is
//! not a certificate table) is refused ([`start`], exit status 2); a missing blob is legal and
//! follows `--missing-certs`.
//!
//! It judges with a store of its own that keeps no inotify instance (each is a per-user budget
//! that the serving store needs) and logs nothing itself. Each second it looks at the path's
//! stamps (device, inode, size, mtime, ctime) with one `stat`, and only when they changed, or
//! the version it judged was read too soon after its last change to trust them (the store's
//! [`RACY_WINDOW`] rule), does it read the blob: under the shared lock, as briefly as a request
//! answered at once, and like requests it yields to a waiting updater.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use coco_protocol::table::TableError;
use log::{error, info, warn, Level};
use thiserror::Error;

use crate::argpath::{self, ArgPathError, Want};
use crate::blob::{BlobError, BlobStore, Fetch, FileKey, RACY_WINDOW};
use crate::config::{Config, MissingCerts};
use crate::metrics::Metrics;
use crate::tool::check::{self, CheckOptions, Report};

/// How often the blob is looked at for a change.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often an unchanged blob is checked again, for certificates that expire meanwhile.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Why `serve` refuses to start: `--certs` cannot be a blob. Exit status 2.
#[derive(Debug, Error)]
pub enum StartError {
    /// A directory, an unreadable path, a path through a file.
    #[error("{0}: refusing to start")]
    Path(#[from] ArgPathError),
    /// A file that is not a certificate table.
    #[error(
        "--certs {path}: not a certificate blob: {error}: {hint}: refusing to start \
         (`coco-sidecar blob check {path}` says more; build a blob with `coco-sidecar blob \
         import DIR {path}`)",
        hint = check::structure_hint(.error)
    )]
    NotABlob { path: String, error: TableError },
}

/// One judgement of the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    /// How loud the line is.
    pub level: Level,
    /// The line, without the time: a new judgement is logged only when it differs.
    pub line: String,
    /// Servable, and `blob check` finds no error.
    pub valid: bool,
    /// The VCEK's or VLEK's `notAfter`, Unix seconds.
    pub vek_not_after: Option<u64>,
}

/// The path's stamps now ([`FileKey`]), if it can be looked at.
fn stamps(path: &Path) -> Option<FileKey> {
    std::fs::metadata(path).ok().as_ref().map(FileKey::of)
}

/// The bytes last judged (to notice a change), or the reason there were none.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Bytes(Arc<[u8]>),
    Not(String),
}

/// What follows for guests when the blob cannot be served now.
fn eagain_then(config_missing: MissingCerts, missing: bool) -> &'static str {
    match (missing, config_missing) {
        (true, MissingCerts::Empty) => {
            "guests get the empty table (--missing-certs empty) and attest without the host's chain"
        }
        (true, MissingCerts::Io) => {
            "guests get EIO (--missing-certs eio) and cannot attest again until they reboot"
        }
        _ => "guests get EAGAIN, and the empty table once that lasted --max-eagain-ms",
    }
}

fn describe_vek(report: &Report) -> String {
    match &report.vek {
        None => "no VCEK or VLEK".to_owned(),
        Some(v) => {
            let product = v
                .product
                .as_deref()
                .map_or(String::new(), |p| format!("{p} "));
            let tcb = v
                .tcb
                .as_deref()
                .map_or(String::new(), |t| format!(", TCB {t}"));
            format!(
                "{product}{}{tcb}, valid until {}",
                v.kind.to_uppercase(),
                v.not_after
            )
        }
    }
}

/// Judges a servable table with `blob check` at `at`.
fn judge_table(path: &Path, bytes: &[u8], at: SystemTime) -> Judgement {
    let report = check::check(
        bytes,
        &CheckOptions {
            at,
            expect_tcb: Vec::new(),
        },
    );
    let p = path.display();
    let vek = describe_vek(&report);
    let problems: Vec<String> = report
        .findings
        .iter()
        .filter(|f| f.level != check::Level::Ok)
        .map(check::Finding::what)
        .collect();
    let size = format!("{} entries, {} bytes", report.entries, report.size);
    let (level, line) = match (report.errors(), report.warnings()) {
        (0, 0) => (
            Level::Info,
            format!("blob {p}: OK: {vek}; {size}, chain verified"),
        ),
        (0, w) => (
            Level::Warn,
            format!(
                "blob {p}: servable, {w} warning(s): {}; {vek}; {size}: see `coco-sidecar blob \
                 check {p}`",
                problems.join("; ")
            ),
        ),
        (e, _) => (
            Level::Error,
            format!(
                "blob {p}: served, but {e} error(s) make verifiers reject it: {}; {vek}; \
                 {size}: install a good blob (`coco-sidecar blob install NEW {p}`)",
                problems.join("; ")
            ),
        ),
    };
    Judgement {
        level,
        line,
        valid: report.errors() == 0,
        vek_not_after: report.vek.as_ref().map(|v| v.not_after_unix),
    }
}

/// Judges what the store could not serve; `None` for what passes by itself (an updater holds
/// the lock, or the file changed while it was read).
fn judge_error(path: &Path, missing: MissingCerts, why: &BlobError) -> Option<Judgement> {
    let p = path.display();
    let (level, line) = match why {
        BlobError::Locked { .. } | BlobError::UpdaterWaiting { .. } | BlobError::Changed(_) => {
            return None
        }
        BlobError::Missing(_) => {
            let level = if missing == MissingCerts::Empty {
                Level::Warn
            } else {
                Level::Error
            };
            (
                level,
                format!(
                    "blob {p}: does not exist: {}; create it with `coco-sidecar blob import DIR \
                     {p}`",
                    eagain_then(missing, true)
                ),
            )
        }
        BlobError::Invalid { error, .. } => (
            Level::Error,
            format!(
                "blob {p}: NOT servable: {error}: {}; {}: install a good blob (`coco-sidecar \
                 blob install NEW {p}`)",
                check::structure_hint(error),
                eagain_then(missing, false)
            ),
        ),
        BlobError::InstallInterrupted(_) => (
            Level::Error,
            format!(
                "blob {p}: left half-written by an interrupted `blob install`; {}: run \
                 `coco-sidecar blob recover {p}`",
                eagain_then(missing, false)
            ),
        ),
        BlobError::NotRegular(_) | BlobError::Io { .. } => (
            Level::Error,
            format!(
                "blob {p}: NOT servable: {}; {}",
                argpath::misfit(path, Want::Blob).unwrap_or_else(|| why.to_string()),
                eagain_then(missing, false)
            ),
        ),
    };
    Some(Judgement {
        level,
        line,
        valid: false,
        vek_not_after: None,
    })
}

fn log_judgement(j: &Judgement) {
    match j.level {
        Level::Error => error!("{}", j.line),
        Level::Warn => warn!("{}", j.line),
        _ => info!("{}", j.line),
    }
}

/// Watches one blob for `serve`.
#[derive(Debug)]
pub struct Monitor {
    store: BlobStore,
    missing: MissingCerts,
    seen: Option<Seen>,
    last: Option<Judgement>,
    checked: Instant,
    /// The stamps of the version last read, when they can be trusted to change with it.
    trusted: Option<FileKey>,
}

/// Judges the blob of `config` before `serve` binds its socket: refuses a `--certs` that cannot
/// be a blob, logs one line about the blob otherwise, and returns the monitor that goes on
/// watching it ([`Monitor::spawn`]).
pub fn start(config: &Config) -> Result<Monitor, StartError> {
    let path = &config.certs;
    argpath::check("--certs", path, Want::Blob)?;
    // Opening tells apart what cannot be a blob from a blob that is not there (yet).
    if let Err(e) = File::open(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(argpath::explain("--certs", path, Want::Blob, e).into());
        }
    }
    let store = BlobStore::new(path, config.lock_wait, config.missing_certs)
        .unwatched()
        .quiet();
    let mut monitor = Monitor {
        store,
        missing: config.missing_certs,
        seen: None,
        last: None,
        checked: Instant::now(),
        trusted: None,
    };
    match monitor.store.fetch() {
        Fetch::Again(BlobError::Invalid { error, .. }) => {
            return Err(StartError::NotABlob {
                path: path.display().to_string(),
                error,
            })
        }
        Fetch::Again(BlobError::Locked { .. } | BlobError::UpdaterWaiting { .. }) => info!(
            "blob {}: locked by an updater at start; judged once it is released",
            path.display()
        ),
        fetched => {
            if let Some(Some(j)) = monitor.look(fetched) {
                log_judgement(&j);
            }
        }
    }
    Ok(monitor)
}

impl Monitor {
    /// Judges what the store fetched when it differs from what was judged last (or the last
    /// check is [`RECHECK_INTERVAL`] old). `None` when it was a passing state (an updater at
    /// work) and nothing was judged; otherwise the judgement when its line is new.
    fn look(&mut self, fetched: Fetch) -> Option<Option<Judgement>> {
        let seen = match &fetched {
            Fetch::Table { lock: None, .. } => Seen::Not("missing".into()),
            Fetch::Table { bytes, .. } => Seen::Bytes(Arc::clone(bytes)),
            Fetch::Again(why) | Fetch::Io(why) => Seen::Not(why.to_string()),
        };
        if self.seen.as_ref() == Some(&seen) && self.checked.elapsed() < RECHECK_INTERVAL {
            return Some(None);
        }
        let path = self.store.path();
        let judgement = match fetched {
            Fetch::Table { lock: None, .. } => {
                judge_error(path, self.missing, &BlobError::Missing(path.to_owned()))
            }
            Fetch::Table { bytes, lock } => {
                // Checking takes milliseconds (RSA signatures): not under the lock.
                drop(lock);
                Some(judge_table(path, &bytes, SystemTime::now()))
            }
            Fetch::Again(why) | Fetch::Io(why) => judge_error(path, self.missing, &why),
        };
        let judgement = judgement?;
        self.seen = Some(seen);
        self.checked = Instant::now();
        let new = self.last.as_ref().map(|j| &j.line) != Some(&judgement.line);
        self.last = Some(judgement.clone());
        Some(new.then_some(judgement))
    }

    /// The last judgement, if there was one.
    pub fn last(&self) -> Option<&Judgement> {
        self.last.as_ref()
    }

    /// Looks at the blob once: judges it if it changed, updates `metrics`, then logs the
    /// judgement if it is new.
    pub fn poll(&mut self, metrics: &Metrics) {
        // Taken before the read: a change during it shows at the next look.
        let (now, at) = (stamps(self.store.path()), SystemTime::now());
        let unchanged = now.is_some() && now == self.trusted;
        if unchanged && self.checked.elapsed() < RECHECK_INTERVAL {
            return;
        }
        let fetched = self.store.fetch();
        let looked = self.look(fetched);
        // Only a version that was read (not an updater's lock) vouches for its stamps.
        self.trusted = looked
            .as_ref()
            .and(now)
            .filter(|s| s.settled_at(at, RACY_WINDOW));
        let new = looked.flatten();
        if let Some(j) = &self.last {
            metrics.set_blob_judged(j.valid, j.vek_not_after);
        }
        if let Some(j) = new {
            log_judgement(&j);
        }
    }

    /// Goes on watching in a thread of its own for as long as the process runs, keeping
    /// `metrics`' blob gauges current.
    pub fn spawn(mut self, metrics: Arc<Metrics>) -> std::io::Result<()> {
        if let Some(j) = &self.last {
            metrics.set_blob_judged(j.valid, j.vek_not_after);
        }
        thread::Builder::new()
            .name("blob-monitor".into())
            .spawn(move || loop {
                thread::sleep(POLL_INTERVAL);
                self.poll(&metrics);
            })
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coco_protocol::table::TableError;

    #[test]
    fn each_kind_of_blob_gets_its_level_and_its_next_step() {
        let p = Path::new("/b/certs.blob");
        // The sample chain's root is not AMD's: servable, with a warning.
        let sample = crate::demo::sample_table();
        let j = judge_table(p, sample.as_bytes(), SystemTime::now());
        assert_eq!(j.level, Level::Warn, "{}", j.line);
        assert!(j.valid);
        assert!(
            j.line
                .contains("servable, 2 warning(s): [0] ark: not one of AMD's"),
            "{}",
            j.line
        );
        assert!(
            j.line
                .contains("see `coco-sidecar blob check /b/certs.blob`"),
            "{}",
            j.line
        );
        // Past the VCEK's end: an error, not valid, still its expiry.
        let later = j
            .vek_not_after
            .map(|t| std::time::UNIX_EPOCH + Duration::from_secs(t + 1));
        let j = judge_table(p, sample.as_bytes(), later.expect("a VCEK"));
        assert_eq!((j.level, j.valid), (Level::Error, false), "{}", j.line);
        assert!(j.line.contains("served, but"), "{}", j.line);

        for (policy, level, says) in [
            (
                MissingCerts::Empty,
                Level::Warn,
                "guests get the empty table",
            ),
            (MissingCerts::Again, Level::Error, "guests get EAGAIN"),
            (MissingCerts::Io, Level::Error, "guests get EIO"),
        ] {
            let j = judge_error(p, policy, &BlobError::Missing(p.into())).expect("judged");
            assert_eq!(j.level, level);
            assert!(j.line.contains(says) && j.line.contains("blob import DIR /b/certs.blob"));
        }
        let invalid = BlobError::Invalid {
            path: p.into(),
            error: TableError::NoTerminator(8),
        };
        let j = judge_error(p, MissingCerts::Empty, &invalid).expect("judged");
        assert!(
            j.line.contains("the file is truncated, or is not a GHCB"),
            "{}",
            j.line
        );
        let half = BlobError::InstallInterrupted(p.into());
        let j = judge_error(p, MissingCerts::Empty, &half).expect("judged");
        assert!(j.line.contains("blob recover /b/certs.blob"), "{}", j.line);
        // An updater at work is not news.
        let locked = BlobError::Locked {
            path: p.into(),
            waited: Duration::ZERO,
        };
        assert_eq!(judge_error(p, MissingCerts::Empty, &locked), None);
    }

    #[test]
    fn an_unchanged_blob_is_not_read_again_and_a_changed_one_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blob = dir.path().join("certs.blob");
        let sample = crate::demo::sample_table();
        std::fs::write(&blob, sample.as_bytes()).expect("write");
        // Older than the racy window: its stamps can be trusted once it was read.
        thread::sleep(RACY_WINDOW + Duration::from_millis(100));
        let config = Config::new(dir.path().join("s.sock"), &blob);
        let mut monitor = start(&config).expect("a blob");
        let metrics = Metrics::new();
        for _ in 0..5 {
            monitor.poll(&metrics);
        }
        // The start, and the first look that learns the stamps: no fetch (no lock) after that.
        assert_eq!(monitor.store.stats().path_checks, 2);
        assert!(metrics.blob_judged().0);
        // A rewrite in place changes the stamps: read and judged again.
        let (ark, ask) = (&crate::demo::SAMPLE_CERTS[0], &crate::demo::SAMPLE_CERTS[1]);
        let two =
            coco_protocol::table::Table::build(&[(ark.0.guid(), ark.1), (ask.0.guid(), ask.1)])
                .expect("table");
        std::fs::write(&blob, two.as_bytes()).expect("rewrite");
        monitor.poll(&metrics);
        assert_eq!(monitor.store.stats().path_checks, 3);
        let line = &monitor.last().expect("judged").line;
        assert!(line.contains("no VCEK or VLEK"), "{line}");
    }
}
