//! Man pages from the clap declarations the binaries parse, so they never drift from
//! `--help`: kpscd(1), one page per mode (kpscd-proxy(1), kpscd-portmap(1)) and
//! kpscctl(1). `cargo xtask package` writes them with the `kpsc-man` binary.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::config::{cli::Cli, ctl::CtlCli};

/// Writes every page into `dir` as `<name>.1`; returns their paths.
pub fn write_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let kpscd = Cli::command().version(env!("CARGO_PKG_VERSION"));
    let mut pages = vec![kpscd.clone(), CtlCli::command()];
    // A page per mode: the flags live there, and `kpscd proxy --help` is where they show.
    for mode in kpscd.get_subcommands() {
        // clap takes owned names only with its `string` feature; this runs once per page.
        let name: &'static str = String::leak(format!("kpscd-{}", mode.get_name()));
        pages.push(
            mode.clone()
                .name(name)
                .bin_name(format!("kpscd {}", mode.get_name()))
                .version(env!("CARGO_PKG_VERSION")),
        );
    }
    let mut written = Vec::new();
    for page in pages {
        let path = dir.join(format!("{}.1", page.get_name()));
        let mut text = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut text)
            .with_context(|| format!("rendering {}", path.display()))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
