//! Reading an operator's policy file, bounded: a file larger than any policy the data
//! plane can hold is refused from its size, before its contents are read.
use std::{
    fs::File,
    io::{self, Read as _},
    path::{Path, PathBuf},
};

use proxy_common::policy::{MAX_LPM_PER_POLICY, MAX_RULES};

use crate::diagnostics::line_col;

/// The longest line one IPv6 prefix takes when written one per line:
/// `    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",` and its newline.
const PREFIX_LINE_V6: u64 = 51;
/// The same for IPv4: `    "255.255.255.255/32",` and its newline.
const PREFIX_LINE_V4: u64 = 26;
/// Everything of one rule besides its prefixes (name, protocols, ports, comments).
const RULE_TEXT: u64 = 4096;
const MIB: u64 = 1 << 20;

/// The largest policy file read: the most prefixes the data plane holds (per family and
/// direction), one per line, plus every rule's other text, rounded up to a MiB (21 MiB).
pub const MAX_POLICY_BYTES: u64 =
    (2 * (MAX_LPM_PER_POLICY as u64 - 1) * (PREFIX_LINE_V4 + PREFIX_LINE_V6)
        + MAX_RULES as u64 * RULE_TEXT)
        .div_ceil(MIB)
        * MIB;

#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("reading {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is {size} bytes; a policy file may be at most {limit} bytes",
        path.display()
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    /// A file whose size is not known up front (a pipe, a /proc file) that went on.
    #[error(
        "{} holds more than {limit} bytes; a policy file may be at most {limit} bytes",
        path.display()
    )]
    Overflowed { path: PathBuf, limit: u64 },
    #[error("{}:{line}:{column}: not UTF-8: a policy file is TOML text", path.display())]
    NotUtf8 {
        path: PathBuf,
        line: usize,
        column: usize,
    },
}

/// Reads the policy file at `path`, at most [`MAX_POLICY_BYTES`] of it.
pub fn read_policy_file(path: &Path) -> Result<String, PolicyFileError> {
    read_bounded(path, MAX_POLICY_BYTES)
}

fn read_bounded(path: &Path, limit: u64) -> Result<String, PolicyFileError> {
    let io = |source| PolicyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > limit {
        return Err(PolicyFileError::TooLarge {
            path: path.to_owned(),
            size,
            limit,
        });
    }
    // The size can be 0 (pipes, /proc) or grow after the check: the read is bounded too.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(PolicyFileError::Overflowed {
            path: path.to_owned(),
            limit,
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let text = std::str::from_utf8(&e.as_bytes()[..valid]).unwrap_or_default();
        let (line, column) = line_col(text, valid);
        PolicyFileError::NotUtf8 {
            path: path.to_owned(),
            line,
            column,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A fresh path under the temporary directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            Self(std::env::temp_dir().join(format!("ep-policy-file-{}-{name}", std::process::id())))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn the_cap_holds_the_largest_policy_the_data_plane_can_hold() {
        let needed = 2 * (MAX_LPM_PER_POLICY as u64 - 1) * (PREFIX_LINE_V4 + PREFIX_LINE_V6);
        assert!(MAX_POLICY_BYTES >= needed + MAX_RULES as u64 * RULE_TEXT);
        assert_eq!(MAX_POLICY_BYTES, 21 * MIB);
    }

    #[test]
    fn a_file_over_the_cap_is_refused_from_its_size() {
        let f = Scratch::new("sparse");
        // Sparse: no data blocks. The size alone must refuse it.
        File::create(&f.0)
            .and_then(|h| h.set_len(MAX_POLICY_BYTES + 1))
            .expect("sparse file");
        let t = Instant::now();
        let err = read_policy_file(&f.0).expect_err("over the cap");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(
            matches!(err, PolicyFileError::TooLarge { size, .. } if size == MAX_POLICY_BYTES + 1),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "{} is {} bytes; a policy file may be at most {MAX_POLICY_BYTES} bytes",
                f.0.display(),
                MAX_POLICY_BYTES + 1
            )
        );
    }

    #[test]
    fn a_file_of_unknown_size_is_read_only_up_to_the_cap() {
        // /proc files report size 0 and hold more than 16 bytes.
        let err = read_bounded(Path::new("/proc/self/status"), 16).expect_err("over 16 bytes");
        assert!(
            matches!(err, PolicyFileError::Overflowed { limit: 16, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .ends_with("holds more than 16 bytes; a policy file may be at most 16 bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_file_at_the_cap_is_read_and_bad_text_is_located() {
        let f = Scratch::new("text");
        std::fs::write(&f.0, "default = \"pass\"\n").expect("write");
        assert_eq!(
            read_bounded(&f.0, 17).expect("17 bytes fit"),
            "default = \"pass\"\n"
        );
        std::fs::write(&f.0, b"# ok\nname = \"\xff\"\n").expect("write");
        let err = read_policy_file(&f.0).expect_err("not UTF-8");
        assert_eq!(
            err.to_string(),
            format!(
                "{}:2:9: not UTF-8: a policy file is TOML text",
                f.0.display()
            )
        );
        let missing = Scratch::new("missing");
        assert!(matches!(
            read_policy_file(&missing.0),
            Err(PolicyFileError::Io { .. })
        ));
    }
}
