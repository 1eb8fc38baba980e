//! Man pages and shell completion scripts, generated from the command-line definitions
//! themselves (`clap_mangen`, `clap_complete`), so that they cannot drift from `--help`:
//! `coco-sidecar man DIR` and `coco-sidecar completions SHELL` (docs/kubernetes.md, "Nodes").

use std::io;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// The completion script of `cmd` for `shell`.
pub fn completions(mut cmd: clap::Command, shell: Shell) -> Vec<u8> {
    let name = cmd.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name.clone(), &mut script);
    if shell == Shell::Bash {
        // clap_complete 4.6 spells the state of a hyphenated binary one way in the loop that
        // follows the words (`coco__sidecar__subcmd__blob`) and another in the arms that match
        // it (`coco__subcmd__sidecar__subcmd__blob`), so nothing after the first word completes
        // (clap-rs/clap#6421, #6529, unfixed upstream). Spell the arms as the loop does.
        let (arms, state) = (name.replace('-', "__subcmd__"), name.replace('-', "__"));
        if arms != state {
            script = String::from_utf8_lossy(&script)
                .replace(&format!("{arms}__subcmd__"), &format!("{state}__subcmd__"))
                .into_bytes();
        }
    }
    script
}

/// Writes one man page per command and subcommand of `cmd` into `dir` (created if missing):
/// `coco-sidecar.1`, `coco-sidecar-serve.1`, `coco-sidecar-blob-import.1`, ... Returns the
/// pages written, sorted.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fn generate(cmd: clap::Command, dir: &Path, pages: &mut Vec<PathBuf>) -> io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            generate(sub, dir, pages)?;
        }
        let source = format!("coco-sidecar {}", env!("CARGO_PKG_VERSION"));
        let man = clap_mangen::Man::new(cmd)
            .source(source)
            .manual("coco-sidecar manual");
        pages.push(man.generate_to(dir)?);
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    // As clap_mangen::generate_to does: subcommands get their full names once built, and
    // `help` gets no page.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    generate(cmd, dir, &mut pages)?;
    pages.sort();
    Ok(pages)
}
