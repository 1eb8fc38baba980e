//! `--max-eagain-ms` (issue 12, docs/protocol.md section 6.4), through the real sidecar: no
//! connection's guest sees EAGAIN for the blob continuously for longer than the bound; past
//! it the guest gets the empty table (ret 0, 24 zero bytes, no lease), logged once with the
//! reason and counted in `coco_sidecar_eagain_fallbacks_total`, until the blob is servable
//! again. Whatever keeps the blob from being served: an updater's lock, an invalid file, a
//! missing one under `--missing-certs again`, one that cannot be read.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::table::EMPTY_TABLE;
use coco_protocol::{Abi, CertsRet, Frontend};
use coco_tests::updaters::{connect_with_ram, old_and_new, MEM};
use coco_tests::{http_get, metrics_addr, GuestMem, HeldLock, Sidecar};

const POISON: u8 = 0xa5;
const BOUND_MS: u64 = 400;

fn sidecar(blob: &Path, extra: &[&str]) -> Sidecar {
    let bound = BOUND_MS.to_string();
    let mut args = vec![
        "--max-eagain-ms",
        &bound,
        "--lock-wait-ms",
        "20",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Sidecar::start(blob, &args)
}

/// One request; the guest's buffer is poisoned first. Returns (ret, lease, when it was sent,
/// when the answer came).
fn ask(fe: &mut Frontend, mem: &GuestMem) -> (CertsRet, u64, Instant, Instant) {
    mem.write(0, &vec![POISON; MEM as usize]);
    let sent = Instant::now();
    let r = fe
        .request_certs(Abi::SnpReqCerts, 0, 0, MEM / 4096)
        .expect("request");
    (r.ret, r.lease, sent, Instant::now())
}

fn fallbacks(sidecar: &Sidecar) -> u64 {
    let body = http_get(metrics_addr(sidecar), "/metrics").body;
    body.lines()
        .find_map(|l| l.strip_prefix("coco_sidecar_eagain_fallbacks_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fallback counter in:\n{body}"))
}

/// Asks every 50 ms while the blob stays unservable, for three times the bound. EAGAIN only
/// while the run can be shorter than the bound, the empty table only once it cannot; once
/// the empty table came, it keeps coming. Returns how many empty tables came.
fn eagain_then_empty(fe: &mut Frontend, mem: &GuestMem) -> u64 {
    let bound = Duration::from_millis(BOUND_MS);
    let (ret, _, first_sent, first_answered) = ask(fe, mem);
    assert_eq!(ret, CertsRet::Again, "the run starts with EAGAIN");
    let mut empty = 0;
    while first_sent.elapsed() < 3 * bound {
        thread::sleep(Duration::from_millis(50));
        let (ret, lease, sent, answered) = ask(fe, mem);
        match ret {
            // The sidecar started the run between first_sent and first_answered, and decided
            // this one between sent and answered.
            CertsRet::Again => {
                assert_eq!(empty, 0, "EAGAIN after the empty table");
                assert!(
                    sent < first_answered + bound,
                    "EAGAIN {:?} into the run",
                    sent - first_answered
                );
                assert_eq!(mem.read(0, MEM as usize), vec![POISON; MEM as usize]);
            }
            CertsRet::Ok => {
                assert!(answered >= first_sent + bound, "the empty table too early");
                assert_eq!(lease, 0, "no lease for the empty table");
                assert_eq!(mem.read(0, EMPTY_TABLE.len()), EMPTY_TABLE);
                assert!(
                    mem.read(24, MEM as usize - 24).iter().all(|b| *b == POISON),
                    "only the 24-byte terminator is written"
                );
                empty += 1;
            }
            other => panic!("ret {other:?}"),
        }
    }
    assert!(empty > 0, "EAGAIN lasted {:?}", first_sent.elapsed());
    empty
}

/// The reasons the log gives each time a run passed the bound, as one of `REASONS`.
fn bound_passed(sidecar: &Sidecar) -> Vec<&'static str> {
    const REASONS: [&str; 4] = [
        "is locked by an updater",
        "is not a valid certificate table",
        "does not exist",
        "is not a regular file",
    ];
    sidecar
        .log()
        .lines()
        .filter(|l| l.contains(&format!("has not been servable for {BOUND_MS} ms (")))
        .map(|l| {
            let reason = REASONS.iter().find(|r| l.contains(*r));
            *reason.unwrap_or_else(|| panic!("no known reason in {l:?}"))
        })
        .collect()
}

fn assert_serves(fe: &mut Frontend, mem: &GuestMem, table: &[u8]) {
    let (ret, lease, ..) = ask(fe, mem);
    assert_eq!(ret, CertsRet::Ok);
    assert_ne!(lease, 0, "a lease: the blob itself is served");
    assert_eq!(mem.read(0, table.len()), table);
    fe.done(lease).expect("done");
}

#[test]
fn a_locked_blob_is_eagain_for_at_most_the_bound_then_the_empty_table() {
    let (old, _) = old_and_new();
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = dir.path().join("certs.blob");
    std::fs::write(&blob, &old).expect("write");
    let sidecar = sidecar(&blob, &[]);
    let (mut fe, mem) = connect_with_ram(&sidecar.socket, POISON);
    assert_serves(&mut fe, &mem, &old);

    let updater = HeldLock::take("exclusive", &blob);
    let empty = eagain_then_empty(&mut fe, &mem);
    assert_eq!(fallbacks(&sidecar), empty, "every empty table counted");
    assert_eq!(
        bound_passed(&sidecar),
        ["is locked by an updater"],
        "logged once"
    );

    // Servable again: the blob, with a lease; a new lock starts a new run.
    updater.release();
    assert_serves(&mut fe, &mem, &old);
    assert!(sidecar.log().contains("servable again"));
    let updater = HeldLock::take("exclusive", &blob);
    let more = eagain_then_empty(&mut fe, &mem);
    assert_eq!(fallbacks(&sidecar), empty + more);
    assert_eq!(bound_passed(&sidecar).len(), 2, "logged once per run");
    updater.release();
    assert_serves(&mut fe, &mem, &old);
}

#[test]
fn invalid_missing_and_unreadable_blobs_are_bounded_too() {
    let (old, _) = old_and_new();
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = dir.path().join("certs.blob");
    // serve refuses to start on a file that is not a blob: it becomes one after the start.
    std::fs::write(&blob, &old).expect("write");
    let sidecar = sidecar(&blob, &["--missing-certs", "again"]);
    std::fs::write(&blob, b"not a certificate table").expect("write");
    let (mut fe, mem) = connect_with_ram(&sidecar.socket, POISON);
    eagain_then_empty(&mut fe, &mem);
    assert_eq!(bound_passed(&sidecar), ["is not a valid certificate table"]);
    std::fs::write(&blob, &old).expect("write");
    assert_serves(&mut fe, &mem, &old);

    std::fs::remove_file(&blob).expect("rm");
    eagain_then_empty(&mut fe, &mem);
    assert_eq!(
        bound_passed(&sidecar),
        ["is not a valid certificate table", "does not exist"]
    );
    std::fs::write(&blob, &old).expect("write");
    assert_serves(&mut fe, &mem, &old);

    // Unreadable: a directory where the blob should be.
    std::fs::remove_file(&blob).expect("rm");
    std::fs::create_dir(&blob).expect("mkdir");
    eagain_then_empty(&mut fe, &mem);
    assert_eq!(bound_passed(&sidecar)[2..], ["is not a regular file"]);
    std::fs::remove_dir(&blob).expect("rmdir");
    std::fs::write(&blob, &old).expect("write");
    assert_serves(&mut fe, &mem, &old);
}
