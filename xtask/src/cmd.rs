//! External commands: argument vectors only (never a shell string), each announced
//! before it runs, each failure reported with the command line and exit status.
use std::{
    ffi::{OsStr, OsString},
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

pub struct Cmd {
    cmd: Command,
    say: Option<String>,
}

impl Cmd {
    pub fn new<I, S>(program: impl AsRef<OsStr>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(crate::root());
        Self { cmd, say: None }
    }

    /// One line telling the operator what this step is for.
    pub fn say(mut self, what: impl Into<String>) -> Self {
        self.say = Some(what.into());
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.cmd.env(k, v);
        self
    }

    pub fn dir(mut self, d: impl AsRef<Path>) -> Self {
        self.cmd.current_dir(d);
        self
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.cmd.arg(a);
        self
    }

    fn announce(&self) {
        if let Some(s) = &self.say {
            eprintln!("xtask: {s}");
        }
        eprintln!("xtask:   $ {}", self.display());
    }

    fn display(&self) -> String {
        let mut parts = vec![self.cmd.get_program().to_string_lossy().into_owned()];
        parts.extend(
            self.cmd
                .get_args()
                .map(|a| a.to_string_lossy().into_owned()),
        );
        parts.join(" ")
    }

    /// Runs with inherited stdio; fails on a non-zero exit.
    pub fn run(mut self) -> anyhow::Result<()> {
        self.announce();
        let status = self
            .cmd
            .status()
            .with_context(|| format!("cannot start `{}`", self.display()))?;
        if !status.success() {
            bail!("`{}` failed ({status})", self.display());
        }
        Ok(())
    }

    /// Runs quietly and returns stdout; fails (with stderr) on a non-zero exit.
    pub fn output(mut self) -> anyhow::Result<String> {
        let out = self
            .cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .output()
            .with_context(|| format!("cannot start `{}`", self.display()))?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                self.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs, echoing stdout line by line and handing each line to `on_line`.
    pub fn run_tee(mut self, mut on_line: impl FnMut(&str)) -> anyhow::Result<()> {
        self.announce();
        let mut child = self
            .cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.display()))?;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let line = line.context("reading the command's output")?;
                println!("{line}");
                on_line(&line);
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("`{}` failed ({status})", self.display());
        }
        Ok(())
    }

    /// Runs, handing each stderr line to `on_line`, which says whether to echo it
    /// (libFuzzer reports on stderr, a line per new input). Returns whether the command
    /// succeeded: the caller reads the reason from the lines.
    pub fn run_stderr(mut self, mut on_line: impl FnMut(&str) -> bool) -> anyhow::Result<bool> {
        self.announce();
        let mut child = self
            .cmd
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.display()))?;
        if let Some(err) = child.stderr.take() {
            for line in BufReader::new(err).split(b'\n') {
                let line = line.context("reading the command's output")?;
                let line = String::from_utf8_lossy(&line);
                if on_line(&line) {
                    eprintln!("{line}");
                }
            }
        }
        Ok(child.wait()?.success())
    }
}

/// `cargo +<toolchain> args…` from the repository root.
pub fn cargo<I, S>(toolchain: &str, args: I) -> Cmd
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut all: Vec<OsString> = vec![format!("+{toolchain}").into()];
    all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
    // A RUSTC/RUSTUP_TOOLCHAIN from the outer `cargo xtask` (stable) must not leak into
    // builds that need the pinned toolchains.
    let mut c = Cmd::new("cargo", all);
    for var in [
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        c.cmd.env_remove(var);
    }
    c
}

/// First `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
