//! The install kit: shell completions (bash, zsh, fish) and man pages of every pm tool,
//! generated from the same clap definitions the binaries parse, so they cannot drift from the
//! real flags. `pm-lab generate --out DIR` writes them; `scripts/install.sh` installs them.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

/// A file of the kit that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// Creating a directory or writing a file failed.
    #[error("cannot write `{path}`")]
    Write {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The command line of every tool the suite ships, as its binary parses it.
pub fn commands() -> Vec<clap::Command> {
    vec![
        crate::mirror::Args::command(),
        crate::activate::Args::command(),
        crate::agent::Args::command(),
        crate::poll::Args::command(),
        crate::push::Args::command(),
        crate::rollback::Args::command(),
        crate::query::Args::command(),
        crate::exporter::Args::command(),
        crate::doctor::Args::command(),
        crate::lab_cli::Args::command(),
    ]
}

/// Where each shell looks for a completion file of `tool`, relative to the kit's directory
/// (the file names are the ones bash-completion, zsh's `fpath` and fish's vendor directory
/// load on demand).
fn completion_path(shell: Shell, tool: &str) -> PathBuf {
    let file = match shell {
        Shell::Zsh => format!("_{tool}"),
        Shell::Fish => format!("{tool}.fish"),
        _ => tool.to_string(),
    };
    Path::new("completions").join(shell.to_string()).join(file)
}

/// Writes `out/completions/{bash,zsh,fish}/…`, `out/man/man1/<tool>.1` and
/// `<tool>-<subcommand>.1` for every tool and returns the files written. Running it again rewrites the same files.
pub fn generate(out: &Path) -> Result<Vec<PathBuf>, KitError> {
    let mut written = Vec::new();
    for command in commands() {
        let tool = command.get_name().to_string();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut command.clone(), &tool, &mut text);
            if shell == Shell::Bash {
                text = fix_bash_state_names(&tool, &text);
            }
            written.push(write(&out.join(completion_path(shell, &tool)), &text)?);
        }
        let mut command = command.disable_help_subcommand(true);
        command.build();
        write_man_pages(command, &out.join("man/man1"), &mut written)?;
    }
    Ok(written)
}

/// Works around clap_complete's bash script for a binary name with a hyphen (clap-rs/clap
/// issue 6421, open in clap_complete 4.6.11): its dispatch loop spells the state of
/// `pm-push update` as `pm__push__subcmd__update`, but the arms that list the options spell it
/// `pm__subcmd__push__subcmd__update`, so no option of any subcommand ever completes. The arms
/// are renamed the way the loop spells them.
fn fix_bash_state_names(tool: &str, script: &[u8]) -> Vec<u8> {
    let script = String::from_utf8_lossy(script);
    let arm_prefix = format!("{}__", tool.replace('-', "__subcmd__"));
    let loop_prefix = format!("{}__", tool.replace('-', "__"));
    script.replace(&arm_prefix, &loop_prefix).into_bytes()
}

/// Writes the page of `command` and one page per visible subcommand, named as the parent
/// page's SUBCOMMANDS section refers to them (`pm-push-update.1`).
fn write_man_pages(
    command: clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), KitError> {
    for subcommand in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        write_man_pages(subcommand.clone(), dir, written)?;
    }
    let man = clap_mangen::Man::new(command);
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page).map_err(|source| KitError::Write {
        path: path.clone(),
        source,
    })?;
    written.push(write(&path, &page)?);
    Ok(())
}

fn write(path: &Path, contents: &[u8]) -> Result<PathBuf, KitError> {
    let error = |source| KitError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    std::fs::write(path, contents).map_err(error)?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_its_binary_name_and_is_well_formed() {
        let names: Vec<String> = commands()
            .into_iter()
            .map(|mut command| {
                command.build();
                command.get_name().to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "pm-mirror",
                "pm-activate",
                "pm-agent",
                "pm-poll",
                "pm-push",
                "pm-rollback",
                "pm-query",
                "pm-exporter",
                "pm-doctor",
                "pm-lab"
            ]
        );
    }
}
