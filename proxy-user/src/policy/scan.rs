//! One lexical pass over policy text, before `toml` builds it: `toml` spends about
//! 100–1,600 bytes of memory per table or list element, so a file with far more rules
//! or elements than any policy can hold is refused here, at the first excess.
//!
//! The pass knows strings, comments, table headers and brackets, nothing more: text in
//! a string or comment never counts. It counts an upper bound: every `[[rule]]` header
//! and every inline table (in a valid policy the only inline tables are rules written as
//! `rule = [{ … }]`), and, for list elements, every array and every comma inside one.
use proxy_common::policy::MAX_LPM_PER_POLICY;

use super::file::MAX_POLICY_BYTES;

/// `"0.0.0.0/0",`: the shortest list element a file of prefix lists is made of.
const SHORTEST_PREFIX_ELEMENT: u64 = 12;

/// Most list elements (prefixes, ports, protocols) in one file: as many as a file of the
/// largest size holds of the shortest prefixes. Ports one at a time can't go past it.
pub const MAX_LIST_ELEMENTS: usize = (MAX_POLICY_BYTES / SHORTEST_PREFIX_ELEMENT) as usize;
const _: () = assert!(
    MAX_LIST_ELEMENTS >= 4 * (MAX_LPM_PER_POLICY as usize - 1),
    "every prefix the data plane holds, per family and direction, fits"
);

/// The first count past its limit, with the byte offset of the item that passed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Excess {
    Rules { at: usize },
    Elements { at: usize },
}

/// Counts rules and list elements in `src`, stopping at the first past its limit.
pub fn first_excess(src: &str, max_rules: usize, max_elements: usize) -> Option<Excess> {
    let b = src.as_bytes();
    let (mut rules, mut elements) = (0usize, 0usize);
    // Open arrays and inline tables of the value being read: a `[` at depth 0 that
    // begins a line is a table header; anywhere else it opens an array.
    let mut depth = 0usize;
    let mut line_start = true;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line_start = true;
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' => {
                i += 1;
                continue;
            }
            b'#' => i = line_end(b, i),
            b'"' | b'\'' => i = string_end(b, i),
            b'[' if depth == 0 && line_start => {
                let end = header_end(b, i);
                if is_rule_header(&src[i..end]) {
                    rules += 1;
                    if rules > max_rules {
                        return Some(Excess::Rules { at: i });
                    }
                }
                i = end;
            }
            b'[' | b'{' | b',' => {
                if c == b'{' {
                    rules += 1;
                    if rules > max_rules {
                        return Some(Excess::Rules { at: i });
                    }
                } else if c == b'[' || depth > 0 {
                    elements += 1;
                    if elements > max_elements {
                        return Some(Excess::Elements { at: i });
                    }
                }
                if c != b',' {
                    depth += 1;
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
        line_start = false;
    }
    None
}

/// The newline ending the line at `i` (or the end of the text).
fn line_end(b: &[u8], i: usize) -> usize {
    memchr::memchr(b'\n', &b[i..]).map_or(b.len(), |n| i + n)
}

/// Just past the string opening at `i`: basic or literal, single- or multi-line.
fn string_end(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let triple = b[i..].starts_with(&[q, q, q]);
    let mut j = i + if triple { 3 } else { 1 };
    while j < b.len() {
        match b[j] {
            b'\\' if q == b'"' => j += 2,
            c if c == q && !triple => return j + 1,
            c if c == q && b[j..].starts_with(&[q, q, q]) => {
                // Up to two more quotes are content: `""""` closes a string ending in `"`.
                let extra = b[j + 3..].iter().take(2).take_while(|&&x| x == q).count();
                return j + 3 + extra;
            }
            // An unterminated single-line string: `toml` reports it.
            b'\n' if !triple => return j,
            _ => j += 1,
        }
    }
    b.len()
}

/// The end of the table header at `i`: its newline or comment, outside quoted keys.
fn header_end(b: &[u8], i: usize) -> usize {
    let mut j = i;
    while j < b.len() {
        match b[j] {
            b'\n' | b'#' => return j,
            b'"' | b'\'' => j = string_end(b, j),
            _ => j += 1,
        }
    }
    b.len()
}

/// `[[rule]]`, with the whitespace and quoting TOML allows around the key.
fn is_rule_header(header: &str) -> bool {
    header
        .trim_end()
        .strip_prefix("[[")
        .and_then(|h| h.strip_suffix("]]"))
        .map(str::trim)
        .is_some_and(|key| matches!(key, "rule" | "\"rule\"" | "'rule'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(src: &str, max_rules: usize, max_elements: usize) -> Option<Excess> {
        first_excess(src, max_rules, max_elements)
    }

    #[test]
    fn rule_headers_and_inline_rules_are_counted() {
        let three =
            "[[rule]]\naction = \"pass\"\n[[ rule ]] # two\naction = \"pass\"\n[[\"rule\"]]\n";
        assert_eq!(scan(three, 3, 100), None);
        let third = three.find("[[\"rule").expect("third");
        assert_eq!(scan(three, 2, 100), Some(Excess::Rules { at: third }));
        let inline = "rule = [{ action = \"pass\" }, { action = \"drop\" }]\n";
        assert_eq!(scan(inline, 2, 100), None);
        let second = inline.rfind('{').expect("second");
        assert_eq!(scan(inline, 1, 100), Some(Excess::Rules { at: second }));
        // Other tables are no rules.
        assert_eq!(scan("[[rules]]\n[rule]\n[[rule.x]]\n", 0, 100), None);
    }

    #[test]
    fn strings_and_comments_count_nothing() {
        let src = [
            "# [[rule]] { [1, 2]",
            "[[rule]]",
            "name = \"\"\"",
            "[[rule]]",
            "{ [1,2,3] \\\"\"\" \"\"\"",
            "then = '''",
            "[[rule]]",
            "'''",
            "rate = \"[{,\\\"\"",
            "snap = 'x[{,'",
            "[[rule]]",
            "src = [\"a\", \"b\"] # [[rule]], [",
            "",
        ]
        .join("\n");
        assert_eq!(scan(&src, 2, 2), None);
        let last = src.rfind("[[rule]]\nsrc").expect("last rule");
        assert_eq!(scan(&src, 1, 2), Some(Excess::Rules { at: last }));
        let comma = src.find(", \"b\"").expect("comma");
        assert_eq!(scan(&src, 2, 1), Some(Excess::Elements { at: comma }));
    }

    #[test]
    fn list_elements_are_counted_at_any_depth() {
        // One array and two commas: at most three elements.
        assert_eq!(scan("src = [\n  \"a\",\n  \"b\",\n]\n", 1, 3), None);
        let ports = "dst_port = [1, 2, 3]\n";
        let second_comma = ports.rfind(',').expect("comma");
        assert_eq!(
            scan(ports, 1, 2),
            Some(Excess::Elements { at: second_comma })
        );
        // Nested arrays are elements, and a `[` inside one is no header.
        let nested = "src = [\n[1],\n[2]]\n";
        let inner = nested.rfind('[').expect("inner");
        assert_eq!(scan(nested, 10, 3), Some(Excess::Elements { at: inner }));
    }
}
