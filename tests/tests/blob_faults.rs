//! The blob's updaters under faults (issue 12), through the real binaries: `blob install`
//! killed at random moments while guests keep asking, on a full filesystem, through a
//! symbolic link; `blob recover` of an interrupted install; `blob lock` killed while its
//! COMMAND runs. The node must never lose its blob, never serve a torn table, and never lose
//! an exclusion while its holder still works.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::table::{CertKind, EMPTY_TABLE};
use coco_protocol::{Abi, CertsRet};
use coco_sidecar::blob::INSTALL_MARKER;
use coco_sidecar::tool::journal;
use coco_tests::updaters::{
    blob_cmd, connect_with_ram, listing, old_and_new, output_text, staged, synthetic_table,
    wait_for_file, Staged, MEM,
};
use coco_tests::{exclusive_lock_free, Sidecar, StopOnDrop, TmpfsMount};

const POISON: u8 = 0xa5;
/// Installs started and killed in the random-kill test.
const ROUNDS: u64 = 24;

fn install(new: &Path, blob: &Path, wait_ms: u64) -> Command {
    let mut c = blob_cmd();
    c.arg("install")
        .arg(new)
        .arg(blob)
        .args(["--wait-ms", &wait_ms.to_string()]);
    c
}

fn recover(blob: &Path) -> std::process::Output {
    blob_cmd()
        .arg("recover")
        .arg(blob)
        .output()
        .expect("blob recover")
}

/// xorshift64*: reproducible delays without a dependency (the seed is printed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// One guest asking again and again until `stop`; every table it receives must be one of
/// `versions`, complete, and nothing written past it. Counts tables and EAGAINs.
fn guest(socket: &Path, vcpu: u32, versions: &[Vec<u8>; 2], served: &AtomicU64, stop: &AtomicBool) {
    let (mut fe, mem) = connect_with_ram(socket, POISON);
    let poison = vec![POISON; MEM as usize];
    while !stop.load(Ordering::Relaxed) {
        mem.write(0, &poison);
        let r = fe
            .request_certs(Abi::SnpReqCerts, vcpu, 0, MEM / 4096)
            .expect("the sidecar answers");
        match r.ret {
            CertsRet::Again => {
                assert_eq!(mem.read(0, MEM as usize), poison, "EAGAIN wrote");
                continue;
            }
            CertsRet::Ok => {}
            other => panic!("ret {other:?}: only 0 and EAGAIN may come"),
        }
        let got = mem.read(0, MEM as usize);
        let whole = versions
            .iter()
            .any(|v| got[..v.len()] == v[..] && got[v.len()..].iter().all(|b| *b == POISON));
        assert!(
            whole,
            "vcpu {vcpu} was served a table that is neither version"
        );
        served.fetch_add(1, Ordering::Relaxed);
        fe.done(r.lease).expect("done");
        // Hundreds of requests a second, leaving CPU time to the installs.
        thread::sleep(Duration::from_millis(2));
    }
}

/// SIGKILL of `blob install` at random moments while two guests keep asking: every table
/// served is one version byte for byte; after `blob recover` (or the automatic recovery at
/// the start of the next install) the blob is the old or the new version byte for byte, and
/// no temporary file or journal is left beside it.
#[test]
fn install_killed_at_random_moments_never_loses_or_tears_the_blob() {
    let (a, b) = old_and_new();
    let versions = [a, b];
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = dir.path().join("certs.blob");
    std::fs::write(&blob, &versions[0]).expect("write");
    let staged = tempfile::tempdir().expect("tempdir");
    let news: Vec<PathBuf> = versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let p = staged.path().join(format!("{i}.blob"));
            std::fs::write(&p, v).expect("write");
            p
        })
        .collect();
    let sidecar = Sidecar::start(&blob, &["--lock-wait-ms", "20"]);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let served = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let (mut kills, mut finished, mut current) = (0, 0, 0);
    thread::scope(|s| {
        let guests: Vec<_> = (0..2)
            .map(|vcpu| {
                let (socket, versions) = (&sidecar.socket, &versions);
                let (served, stop) = (&served, &stop);
                s.spawn(move || guest(socket, vcpu, versions, served, stop))
            })
            .collect();
        let _stop = StopOnDrop(&stop);
        // How long a whole install takes here (most of it validating NEW).
        let t = Instant::now();
        let out = install(&news[1], &blob, 5000).output().expect("install");
        assert!(out.status.success(), "{}", output_text(&out));
        let full = t.elapsed().as_micros() as u64;
        current = 1;
        // At least ROUNDS rounds, and more (up to 8 times as many) until a kill has landed in
        // the rewrite: its window is short, and on a loaded machine the random kills can miss
        // it for ROUNDS rounds in a row.
        for round in 0.. {
            if round >= ROUNDS && (finished > 0 || round >= ROUNDS * 8) {
                break;
            }
            let target = 1 - current;
            let mut child = install(&news[target], &blob, 5000)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn install");
            // Odd rounds: at any moment of the install, up to a little after its end. Other
            // rounds: within a few milliseconds of a file appearing beside the blob, under the
            // lock: the journal being staged (`.tmp`), or the journal itself, while the blob is
            // being rewritten.
            match round % 4 {
                1 | 3 => thread::sleep(Duration::from_micros(rng.below(full * 12 / 10))),
                r => {
                    let suffix = if r == 2 { ".tmp" } else { ".coco-install" };
                    while !listing(dir.path()).iter().any(|n| n.ends_with(suffix))
                        && child.try_wait().expect("try").is_none()
                    {
                        thread::sleep(Duration::from_micros(100));
                    }
                    // The rewrite is over within a millisecond or so on tmpfs.
                    thread::sleep(Duration::from_micros(rng.below(if r == 0 {
                        300
                    } else {
                        2000
                    })));
                }
            }
            let _ = child.kill();
            let killed = child.wait().expect("wait").signal() == Some(libc::SIGKILL);
            kills += u64::from(killed);
            // Every fourth round, leave the recovery to the next install.
            if killed && round % 4 == 1 {
                continue;
            }
            let out = recover(&blob);
            assert!(out.status.success(), "{}", output_text(&out));
            finished += u64::from(output_text(&out).contains("finished an interrupted install"));
            let now = std::fs::read(&blob).expect("read");
            current = versions
                .iter()
                .position(|v| *v == now)
                .unwrap_or_else(|| panic!("after recover the blob is neither version"));
            assert_eq!(
                listing(dir.path()),
                ["certs.blob"],
                "nothing left beside it"
            );
            assert!(guests.iter().all(|g| !g.is_finished()), "a guest failed");
        }
        let out = recover(&blob);
        assert!(out.status.success(), "{}", output_text(&out));
        stop.store(true, Ordering::Relaxed);
        for g in guests {
            if let Err(panic) = g.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    let now = std::fs::read(&blob).expect("read");
    assert!(versions.contains(&now));
    assert_eq!(listing(dir.path()), ["certs.blob"]);
    let (mut fe, mem) = connect_with_ram(&sidecar.socket, POISON);
    let r = fe
        .request_certs(Abi::SnpReqCerts, 9, 0, MEM / 4096)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok, "served again after the last recover");
    assert_eq!(mem.read(0, now.len()), now);
    eprintln!(
        "{kills} installs killed, {finished} of them mid-rewrite (finished by recover), {} \
         tables served",
        served.load(Ordering::Relaxed)
    );
    assert!(kills >= ROUNDS / 4, "only {kills} installs were killed");
    assert!(
        finished > 0,
        "no kill landed in a rewrite: the test did not test recovery"
    );
    assert!(served.load(Ordering::Relaxed) > 0);
}

/// An interrupted install (journal written, first entry marked): sidecars refuse the file
/// (EAGAIN, and a log line that says what to do), `blob check` says so too, and
/// `blob recover` finishes it, idempotently.
#[test]
fn recover_finishes_an_interrupted_install_that_sidecars_do_not_serve() {
    let (old, new) = old_and_new();
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = dir.path().join("certs.blob");
    std::fs::write(&blob, &old).expect("write");
    {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&blob)
            .expect("open");
        journal::write_journal(&file, &blob, &new).expect("journal");
        std::os::unix::fs::FileExt::write_all_at(&file, &INSTALL_MARKER, 0).expect("mark");
    }
    // A leftover temporary file of a killed install.
    std::fs::write(dir.path().join(".certs.blob.Xy12ab.tmp"), b"partial").expect("write");
    let sidecar = Sidecar::start(&blob, &["--lock-wait-ms", "20"]);
    let (mut fe, _mem) = connect_with_ram(&sidecar.socket, POISON);
    let r = fe
        .request_certs(Abi::SnpReqCerts, 0, 0, MEM / 4096)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Again);
    assert!(
        sidecar.log().contains(
            "left half-written by an interrupted `blob install`: run `coco-sidecar blob recover"
        ),
        "{}",
        sidecar.log()
    );
    let out = blob_cmd().arg("check").arg(&blob).output().expect("check");
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("blob recover"),
        "{}",
        output_text(&out)
    );

    let out = recover(&blob);
    assert!(out.status.success(), "{}", output_text(&out));
    let said = output_text(&out);
    assert!(said.contains("finished an interrupted install"), "{said}");
    assert!(said.contains("removed 1 leftover temporary file"), "{said}");
    assert!(
        said.contains(&format!("valid ({} bytes)", new.len())),
        "{said}"
    );
    assert_eq!(std::fs::read(&blob).expect("read"), new);
    assert_eq!(listing(dir.path()), ["certs.blob"]);
    let (mut fe, mem) = connect_with_ram(&sidecar.socket, POISON);
    let r = fe
        .request_certs(Abi::SnpReqCerts, 0, 0, MEM / 4096)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mem.read(0, new.len()), new);

    let out = recover(&blob);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("no interrupted install"));
    assert_eq!(std::fs::read(&blob).expect("read"), new);

    // Nothing to finish, and not a table: status 2. No blob: status 3.
    std::fs::write(&blob, b"not a table").expect("write");
    let out = recover(&blob);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("not a valid certificate table"));
    let out = recover(&dir.path().join("absent.blob"));
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(output_text(&out).contains("does not exist"));
}

/// The blob on a tmpfs with too little room: for the journal, or for the journal and the
/// larger new blob. The install fails with a clear error before the old content is touched,
/// the old blob is served throughout, and nothing is left beside it. With one page more it
/// succeeds.
#[test]
fn install_onto_a_full_filesystem_keeps_the_old_blob() {
    // One page: the old blob; the new one and its journal take two pages each.
    let old = synthetic_table(&[(CertKind::Ark, "ark")]);
    let (_, new) = old_and_new();
    assert!(old.len() <= 4096 && (4097..=8192 - 72).contains(&new.len()));
    let staged = tempfile::tempdir().expect("tempdir");
    let new_path = staged.path().join("new.blob");
    std::fs::write(&new_path, &new).expect("write");
    for (free, fits) in [(1, false), (2, false), (3, true)] {
        let Some(fs) = TmpfsMount::or_skip("install_onto_a_full_filesystem", 4096 * (1 + free))
        else {
            return;
        };
        let blob = fs.path().join("certs.blob");
        std::fs::write(&blob, &old).expect("write");
        assert_eq!(fs.free_pages(), free, "set-up: {free} pages free");
        let sidecar = Sidecar::start(&blob, &[]);
        let (mut fe, mem) = connect_with_ram(&sidecar.socket, POISON);
        let out = install(&new_path, &blob, 1000).output().expect("install");
        let expected = if fits {
            assert!(out.status.success(), "{free} pages: {}", output_text(&out));
            &new
        } else {
            assert_eq!(
                out.status.code(),
                Some(3),
                "{free} pages: {}",
                output_text(&out)
            );
            let said = output_text(&out);
            assert!(said.contains("no space left for the new blob"), "{said}");
            assert!(said.contains("is unchanged"), "{said}");
            &old
        };
        assert_eq!(&std::fs::read(&blob).expect("read"), expected);
        assert_eq!(listing(fs.path()), ["certs.blob"], "{free} pages");
        let r = fe
            .request_certs(Abi::SnpReqCerts, 0, 0, MEM / 4096)
            .expect("request");
        assert_eq!(r.ret, CertsRet::Ok);
        assert_eq!(&mem.read(0, expected.len()), expected);
    }
}

/// A symbolic link at BLOB is refused by every updater, clearly; the file it points to is
/// not touched.
#[test]
fn updaters_refuse_a_symbolic_link_at_the_blob() {
    let (old, new) = old_and_new();
    let dir = tempfile::tempdir().expect("tempdir");
    let real = dir.path().join("real.blob");
    std::fs::write(&real, &old).expect("write");
    let link = dir.path().join("certs.blob");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let new_path = dir.path().join("new.blob");
    std::fs::write(&new_path, &new).expect("write");
    let refused = |out: std::process::Output, status: i32| {
        assert_eq!(out.status.code(), Some(status), "{}", output_text(&out));
        let said = output_text(&out);
        assert!(
            said.contains("is a symbolic link") && said.contains("refusing to write through it"),
            "{said}"
        );
    };
    refused(install(&new_path, &link, 100).output().expect("install"), 3);
    refused(
        blob_cmd()
            .arg("lock")
            .arg(&link)
            .args(["--", "true"])
            .output()
            .expect("lock"),
        125,
    );
    refused(recover(&link), 3);
    // A dangling link is not replaced by a new file either.
    std::fs::remove_file(&real).expect("rm");
    refused(install(&new_path, &link, 100).output().expect("install"), 3);
    assert!(!real.exists());
    std::fs::write(&real, &old).expect("write");
    assert_eq!(std::fs::read(&real).expect("read"), old);
}

/// SIGKILL of `blob lock` while COMMAND runs: COMMAND holds the lock through the inherited
/// descriptor (named in the environment) until it ends: the sidecar answers EAGAIN and
/// another install is refused as busy meanwhile.
#[test]
fn blob_lock_killed_while_its_command_runs_keeps_the_lock_until_the_command_ends() {
    let Staged {
        dir,
        old,
        served: blob,
        new_path,
        ..
    } = staged();
    let sidecar = Sidecar::start(&blob, &["--lock-wait-ms", "20"]);
    let (mut fe, mem) = connect_with_ram(&sidecar.socket, POISON);
    let (held, release, info) = (
        dir.path().join("held"),
        dir.path().join("release"),
        dir.path().join("info"),
    );
    // COMMAND notes the descriptor and what it names, says it runs, then waits (at most 20 s)
    // until the test lets it finish.
    let script = format!(
        "fd=$COCO_SIDECAR_BLOB_LOCK_FD; echo \"$fd $(readlink /proc/$$/fd/$fd)\" > '{i}'; \
         touch '{h}'; n=0; while [ ! -e '{r}' ] && [ $n -lt 1000 ]; do sleep 0.02; n=$((n+1)); done",
        i = info.display(),
        h = held.display(),
        r = release.display()
    );
    let mut lock = blob_cmd()
        .arg("lock")
        .arg(&blob)
        .args(["--install", new_path.to_str().expect("utf-8")])
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn blob lock");
    wait_for_file(&held, &mut lock);
    lock.kill().expect("SIGKILL blob lock");
    assert_eq!(lock.wait().expect("wait").signal(), Some(libc::SIGKILL));

    let said = std::fs::read_to_string(&info).expect("info");
    let (fd, target) = said.trim().split_once(' ').expect("fd and target");
    assert!(fd.parse::<u32>().expect("a number") > 2, "{said}");
    assert_eq!(
        Path::new(target),
        blob.canonicalize().expect("canonical"),
        "the descriptor is the blob"
    );
    assert!(!exclusive_lock_free(&blob), "COMMAND still holds the lock");
    let r = fe
        .request_certs(Abi::SnpReqCerts, 0, 0, MEM / 4096)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Again);
    let out = install(&new_path, &blob, 200).output().expect("install");
    assert_eq!(out.status.code(), Some(4), "{}", output_text(&out));
    assert!(output_text(&out).contains("another updater holds the exclusive lock"));

    std::fs::write(&release, b"").expect("release");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exclusive_lock_free(&blob) {
        assert!(Instant::now() < deadline, "COMMAND never let go");
        thread::sleep(Duration::from_millis(20));
    }
    // `blob lock` died before COMMAND ended: its --install did not happen.
    let r = fe
        .request_certs(Abi::SnpReqCerts, 0, 0, MEM / 4096)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mem.read(0, old.len()), old);
    assert_ne!(mem.read(0, EMPTY_TABLE.len()), EMPTY_TABLE);
}
