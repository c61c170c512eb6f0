//! Located problems in an operator's file (policy, configuration): every problem found,
//! each as `file:line:column: reason`.
use std::{fmt, ops::Range};

/// One located problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileErrors {
    pub file: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for FileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: {}", self.file, d.line, d.column, d.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for FileErrors {}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Collects diagnostics while a file is validated.
pub struct Collector<'a> {
    file: &'a str,
    src: &'a str,
    diags: Vec<Diagnostic>,
}

impl<'a> Collector<'a> {
    pub fn new(file: &'a str, src: &'a str) -> Self {
        Self {
            file,
            src,
            diags: Vec::new(),
        }
    }

    pub fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.src, span.start);
        self.diags.push(Diagnostic {
            line,
            column,
            message: message.into(),
        });
    }

    /// A TOML syntax or shape error, located.
    pub fn toml(&mut self, e: &toml::de::Error) {
        self.err(e.span().unwrap_or(0..0), e.message().trim().to_owned());
    }

    pub fn count(&self) -> usize {
        self.diags.len()
    }

    /// `Ok(value)` if nothing was reported.
    pub fn finish<T>(self, value: T) -> Result<T, FileErrors> {
        if self.diags.is_empty() {
            Ok(value)
        } else {
            Err(self.errors())
        }
    }

    pub fn errors(self) -> FileErrors {
        FileErrors {
            file: self.file.to_owned(),
            diagnostics: self.diags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1), "columns count characters");
    }
}
