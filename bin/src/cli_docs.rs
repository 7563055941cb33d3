//! `tidepool completions SHELL` and `tidepool man`: shell completions and man pages generated
//! from the clap definitions, so they never drift from the real flags.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap_complete::Shell;

/// Writes `shell`'s completion script for `cmd` to `w`.
pub fn completions(mut cmd: clap::Command, shell: Shell, w: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, w);
}

/// With `out`: writes `tidepool.1` and one page per subcommand (`tidepool-job-watch.1`, ...)
/// into that directory (created if missing) and returns their paths. Without: writes
/// `tidepool.1` to `w`.
pub fn man(cmd: clap::Command, out: Option<&Path>, w: &mut dyn Write) -> Result<Vec<PathBuf>> {
    let Some(dir) = out else {
        clap_mangen::Man::new(cmd)
            .render(w)
            .context("rendering the man page")?;
        return Ok(Vec::new());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("writing man pages to {}", dir.display()))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    Ok(pages)
}
