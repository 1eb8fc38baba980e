//! The operator kit (issue 14): `deploy/install-node.sh` puts the binary (checked against its
//! checksum), man pages, shell completions and the systemd units of `deploy/systemd` into a
//! root; the units pass `systemd-analyze verify` there (their binaries and their man pages
//! found), the bash completion completes, the man pages render, and the units' own command
//! lines, run as systemd would run them, serve a request through a socket-activated sidecar and
//! install a staged blob.
//!
//! `systemd-analyze` and `systemd-socket-activate` come with Debian's `systemd` package
//! (`tests/operator-kit/setup.sh` installs it): without them the tests that need them print
//! one `SKIPPED:` line, and fail instead under COCO_REQUIRE_SYSTEMD=1.

mod deploy_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use coco_tests::updaters::output_text as text;
use coco_tests::{
    amd_turin_blob, sidecar_bin, skip_unless_required, table_of_size, workspace_root,
};
use deploy_support::{serve_one_request, skipped, Proc};

fn units_dir() -> PathBuf {
    workspace_root().join("deploy/systemd")
}

/// The instances the test verifies: every unit file of deploy/systemd, templates as `vm1`.
const UNITS: [&str; 5] = [
    "coco-sidecar@vm1.socket",
    "coco-sidecar@vm1.service",
    "coco-sidecar-blob-update.path",
    "coco-sidecar-blob-update.service",
    "coco-sidecar-blob-recover.service",
];

/// Whether `tool` runs; otherwise skip (or fail under COCO_REQUIRE_SYSTEMD=1).
fn have(tool: &str, test: &str) -> bool {
    if Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return true;
    }
    let why = format!("{tool} is missing (apt-get install systemd)");
    skip_unless_required("COCO_REQUIRE_SYSTEMD", test, &why);
    false
}

/// The binary under test with its checksum beside it, as build-static.sh leaves them.
fn binary_with_checksum(dir: &Path) -> PathBuf {
    let bin = dir.join("coco-sidecar");
    std::fs::copy(sidecar_bin(), &bin).expect("copy the binary");
    let out = Command::new("sha256sum")
        .arg("coco-sidecar")
        .current_dir(dir)
        .output()
        .expect("sha256sum");
    std::fs::write(dir.join("coco-sidecar.sha256"), &out.stdout).expect("write checksum");
    bin
}

fn install_node(root: &Path, bin: &Path) -> Output {
    Command::new(workspace_root().join("deploy/install-node.sh"))
        .arg("--root")
        .arg(root)
        .arg("--bin")
        .arg(bin)
        .output()
        .expect("run deploy/install-node.sh")
}

#[test]
fn the_node_kit_installs_and_its_units_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let kit = tmp.path().join("kit");
    std::fs::create_dir_all(&kit).expect("mkdir");
    let bin = binary_with_checksum(&kit);
    let root = tmp.path().join("root");

    // A binary that does not match its checksum is not installed.
    let tampered = tmp.path().join("tampered");
    std::fs::create_dir_all(&tampered).expect("mkdir");
    let bad = binary_with_checksum(&tampered);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&bad)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"x"))
        .expect("tamper");
    let o = install_node(&root, &bad);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("does not match"), "{}", text(&o));
    assert!(!root.join("usr/local/bin/coco-sidecar").exists());

    let o = install_node(&root, &bin);
    assert!(o.status.success(), "{}", text(&o));
    let local = root.join("usr/local");
    assert_eq!(
        std::fs::read(local.join("bin/coco-sidecar")).expect("installed"),
        std::fs::read(&bin).expect("binary")
    );
    // One page per command, named as man(1) looks them up: the CLI's documented commands.
    let man1 = local.join("share/man/man1");
    for page in [
        "coco-sidecar",
        "coco-sidecar-serve",
        "coco-sidecar-health",
        "coco-sidecar-demo",
        "coco-sidecar-completions",
        "coco-sidecar-man",
        "coco-sidecar-blob",
        "coco-sidecar-blob-import",
        "coco-sidecar-blob-export",
        "coco-sidecar-blob-show",
        "coco-sidecar-blob-check",
        "coco-sidecar-blob-install",
        "coco-sidecar-blob-lock",
        "coco-sidecar-blob-recover",
    ] {
        assert!(man1.join(format!("{page}.1")).is_file(), "{page}.1 missing");
    }
    assert!(
        !man1.join("coco-sidecar-help.1").exists(),
        "no page for help"
    );
    rendered_man_page_has_the_options(&man1.join("coco-sidecar-serve.1"));
    bash_completion_completes(&local.join("share/bash-completion/completions/coco-sidecar"));
    for unit in UNITS {
        let file = unit.replace("@vm1", "@");
        assert_eq!(
            std::fs::read(root.join("etc/systemd/system").join(&file)).expect("unit"),
            std::fs::read(units_dir().join(&file)).expect("shipped unit"),
            "{file} installed as shipped"
        );
    }

    if !have(
        "systemd-analyze",
        "systemd-analyze verify of deploy/systemd",
    ) {
        return;
    }
    // verify resolves dependencies (sockets.target, sysinit.target, ...) inside the root:
    // give it the system's unit directory.
    let system = Path::new("/lib/systemd/system");
    let dest = root.join("usr/lib/systemd");
    std::fs::create_dir_all(&dest).expect("mkdir");
    let o = Command::new("cp")
        .arg("-a")
        .arg(system)
        .arg(&dest)
        .output()
        .expect("cp");
    assert!(o.status.success(), "{}", text(&o));
    for unit in UNITS {
        // MANPATH: the units' Documentation= pages are looked up among the installed ones.
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(unit)
            .env("MANPATH", local.join("share/man"))
            .env("SYSTEMD_LOG_LEVEL", "notice")
            .output()
            .expect("systemd-analyze");
        // Unknown keys are only warnings to verify: any word from it is a failure here.
        assert!(
            o.status.success() && text(&o).trim().is_empty(),
            "systemd-analyze verify {unit}:\n{}",
            text(&o)
        );
    }
}

fn rendered_man_page_has_the_options(page: &Path) {
    let o = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww"])
        .arg(page)
        .env("MANWIDTH", "100")
        .output();
    let Ok(o) = o else {
        skipped("man page rendering: groff is missing (apt-get install groff-base)");
        return;
    };
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        o.stderr.is_empty(),
        "groff warns: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // groff's tty output overstrikes for bold; keep the letters.
    let shown: String = String::from_utf8_lossy(&o.stdout)
        .split('\u{8}')
        .enumerate()
        .map(|(i, s)| if i == 0 { s } else { s.get(1..).unwrap_or("") })
        .collect();
    for needle in [
        "coco-sidecar-serve",
        "--certs",
        "--missing-certs",
        "--max-eagain-ms",
    ] {
        assert!(shown.contains(needle), "{needle} not in the page:\n{shown}");
    }
}

/// Runs the bash completion function for the words typed so far; returns its candidates.
fn complete(script: &Path, words: &[&str]) -> Vec<String> {
    let cword = words.len() - 1;
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prev = if cword == 0 { "" } else { words[cword - 1] };
    let program = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={cword}; _coco__sidecar coco-sidecar '{}' \
         '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words[cword]
    );
    let o = Command::new("bash")
        .args(["--norc", "-c", &program])
        .output()
        .expect("bash");
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn bash_completion_completes(script: &Path) {
    assert_eq!(complete(script, &["coco-sidecar", "bl"]), ["blob"]);
    assert_eq!(
        complete(script, &["coco-sidecar", "blob", "i"]),
        ["import", "install"]
    );
    assert_eq!(
        complete(script, &["coco-sidecar", "serve", "--missing-certs", ""]),
        ["empty", "again", "eio"]
    );
    assert!(
        complete(script, &["coco-sidecar", "blob", "check", "--exp"])
            .contains(&"--expect-tcb".to_owned())
    );
}

/// A unit file's `Key=value` lines (the last one of each key, `Environment` collected).
fn unit(name: &str) -> (HashMap<String, String>, Vec<(String, String)>) {
    let text = std::fs::read_to_string(units_dir().join(name)).expect("unit file");
    let mut keys = HashMap::new();
    let mut env = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k == "Environment" {
            let v = v.trim_matches('"');
            let (name, value) = v.split_once('=').expect("NAME=value");
            env.push((name.to_owned(), value.to_owned()));
        } else {
            keys.insert(k.to_owned(), v.to_owned());
        }
    }
    (keys, env)
}

/// A unit's ExecStart as systemd expands it (`%i`, `${VAR}` as one word, `$VAR` split on
/// white space), with the node's paths moved under `base` and the binary under test.
fn exec_start(name: &str, base: &Path) -> Vec<String> {
    let (keys, env) = unit(name);
    let line = keys
        .get("ExecStart")
        .expect("ExecStart")
        .replace("%i", "vm1");
    let mut words = Vec::new();
    for word in line.split_whitespace() {
        let expanded: Vec<String> = match env
            .iter()
            .find(|(n, _)| word == format!("${{{n}}}") || word == format!("${n}"))
        {
            Some((_, v)) if word.starts_with("${") => vec![v.clone()],
            Some((_, v)) => v.split_whitespace().map(str::to_owned).collect(),
            None => vec![word.to_owned()],
        };
        words.extend(expanded);
    }
    let bin = sidecar_bin().display().to_string();
    words
        .into_iter()
        .map(|w| {
            w.replace("/usr/local/bin/coco-sidecar", &bin)
                .replace("/var/lib/coco-sidecar", &base.display().to_string())
        })
        .collect()
}

#[test]
fn the_units_command_lines_serve_and_update_as_systemd_runs_them() {
    if !have(
        "systemd-socket-activate",
        "the units' command lines under socket activation",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path();
    let table = table_of_size(4000, 0x5a);
    std::fs::write(base.join("certs.blob"), &table).expect("blob");

    // The socket unit's path, moved under the temporary directory.
    let (socket_keys, _) = unit("coco-sidecar@.socket");
    let listen = socket_keys["ListenStream"].replace("%i", "vm1");
    assert_eq!(listen, "/run/coco-sidecar/vm1.sock");
    let socket = base.join("vm1.sock");
    let argv = exec_start("coco-sidecar@.service", base);
    assert!(
        !argv.iter().any(|w| w == "--socket" || w == "--fd"),
        "the socket comes from systemd: {argv:?}"
    );
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("--listen").arg(&socket).args(&argv);
    let mut sidecar = Proc::spawn(cmd, &base.join("sidecar.log"));
    sidecar.wait_accepting(&socket);
    serve_one_request(&socket, &table);
    assert!(
        sidecar
            .log()
            .contains(&format!("blob {}/certs.blob", base.display())),
        "{}",
        sidecar.log()
    );
    drop(sidecar);

    // A --certs that cannot be a blob exits with a status the unit does not restart on.
    let (service, _) = unit("coco-sidecar@.service");
    let no_restart: Vec<i32> = service["RestartPreventExitStatus"]
        .split_whitespace()
        .map(|c| c.parse().expect("a status"))
        .collect();
    let wrong: Vec<String> = argv
        .iter()
        .map(|w| {
            w.replace(
                &format!("{}/certs.blob", base.display()),
                &base.display().to_string(),
            )
        })
        .collect();
    // systemd-socket-activate starts the program at the first connection, as systemd does.
    let wrong_socket = base.join("vm2.sock");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("--listen").arg(&wrong_socket).args(&wrong);
    let mut refused = Proc::spawn(cmd, &base.join("refused.log"));
    refused.wait_accepting(&wrong_socket);
    let code = refused.wait_exit().code().expect("an exit status");
    assert!(
        no_restart.contains(&code),
        "status {code} not in {no_restart:?}: {}",
        refused.log()
    );
    assert!(
        refused.log().contains("refusing to start"),
        "{}",
        refused.log()
    );

    // The updater's command line installs a staged blob, validated, in place: the real Turin
    // chain passes --strict...
    let argv = exec_start("coco-sidecar-blob-update.service", base);
    let (path_keys, _) = unit("coco-sidecar-blob-update.path");
    assert_eq!(path_keys["PathChanged"], "/var/lib/coco-sidecar/next.blob");
    let turin = amd_turin_blob(base);
    std::fs::copy(&turin, base.join("next.blob")).expect("stage");
    let o = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", text(&o));
    let installed = std::fs::read(base.join("certs.blob")).expect("blob");
    assert_eq!(installed, std::fs::read(&turin).expect("turin"));
    // ... a synthetic chain (not AMD's root, no certificates at all) does not, and the served
    // blob stays.
    std::fs::write(base.join("next.blob"), table_of_size(5000, 0x6b)).expect("stage");
    let o = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("refused"), "{}", text(&o));
    assert_eq!(
        std::fs::read(base.join("certs.blob")).expect("blob"),
        installed
    );
}
