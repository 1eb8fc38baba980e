//! A second process that rewrites the certificate blob as fast as it can, for the stress tests.
//!
//! `coco-test-updater inplace|rename BLOB FILE...`: until stdin closes (or says anything),
//! installs the FILEs' contents in turn at BLOB, then prints `updates N` and exits 0.
//! - `inplace`: what `coco-sidecar blob install` does (minus validation): open BLOB, take the
//!   exclusive OFD lock (checking the path still names the locked file), journal the new
//!   content beside it and rewrite it in place, close; the same library code.
//! - `rename`: what a careless operator does: write a temporary file next to BLOB and rename it
//!   over BLOB, with no lock at all.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coco_sidecar::tool::{install, locking};

fn inplace(blob: &Path, bytes: &[u8]) -> Result<(), String> {
    let file = locking::lock_exclusive(blob, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    install::write_locked(&file, blob, bytes).map_err(|e| e.to_string())?;
    Ok(())
}

fn rename(blob: &Path, tmp: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(tmp, bytes).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(tmp, blob).map_err(|e| format!("rename over {}: {e}", blob.display()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(blob)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: coco-test-updater inplace|rename BLOB FILE...");
        return ExitCode::from(2);
    };
    let blob = PathBuf::from(blob);
    let mut versions = Vec::new();
    for f in &args[3..] {
        match std::fs::read(f) {
            Ok(b) => versions.push(b),
            Err(e) => {
                eprintln!("read {f}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if versions.is_empty() || !matches!(mode.as_str(), "inplace" | "rename") {
        eprintln!("usage: coco-test-updater inplace|rename BLOB FILE...");
        return ExitCode::from(2);
    }
    let tmp = blob.with_extension(format!("tmp-{}", std::process::id()));
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            stop.store(true, Ordering::Relaxed);
        }
    });
    println!("started");
    let _ = std::io::stdout().flush();
    let mut updates = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let bytes = &versions[updates as usize % versions.len()];
        let done = if mode == "inplace" {
            inplace(&blob, bytes)
        } else {
            rename(&blob, &tmp, bytes)
        };
        if let Err(e) = done {
            eprintln!("update {updates}: {e}");
            return ExitCode::from(1);
        }
        updates += 1;
    }
    println!("updates {updates}");
    ExitCode::SUCCESS
}
