//! Rewrites of submitted code.

/// Moves the `sys.argv` line that the official client puts first (spec §6.1) below the
/// file's leading docstring and `from __future__` imports, which must come first.
///
/// Code without such a line, or without `__future__` imports, is returned unchanged.
pub fn relocate_argv_line(code: &str) -> String {
    let Some((first, rest)) = code.split_once('\n') else {
        return code.to_string();
    };
    let t = first.trim();
    if !(t.starts_with("import sys") && t.contains("sys.argv")) {
        return code.to_string();
    }
    let lines: Vec<&str> = rest.split('\n').collect();
    // Find the last line of the prologue: comments, blank lines, one docstring and
    // `from __future__` imports.
    let mut i = 0;
    let mut insert_after: Option<usize> = None;
    let mut seen_docstring = false;
    while i < lines.len() {
        let l = lines[i].trim();
        if l.is_empty() || l.starts_with('#') {
            i += 1;
            continue;
        }
        if !seen_docstring && (l.starts_with("\"\"\"") || l.starts_with("'''")) {
            seen_docstring = true;
            let quote = &l[..3];
            let body = &l[3..];
            if !body.contains(quote) {
                // Multi-line docstring: skip to its closing quote.
                i += 1;
                while i < lines.len() && !lines[i].contains(quote) {
                    i += 1;
                }
            }
            i += 1;
            continue;
        }
        if l.starts_with("from __future__ import") {
            insert_after = Some(i);
            i += 1;
            continue;
        }
        break;
    }
    let Some(at) = insert_after else {
        return code.to_string();
    };
    let mut out: Vec<&str> = Vec::with_capacity(lines.len() + 1);
    out.extend_from_slice(&lines[..=at]);
    out.push(first);
    out.extend_from_slice(&lines[at + 1..]);
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_argv_below_future_imports() {
        let code = "import sys; sys.argv = ['s.py', 'a']\n\"\"\"Doc.\n\nmore\"\"\"\nfrom __future__ import annotations\nprint(1)\n";
        let out = relocate_argv_line(code);
        assert_eq!(
            out,
            "\"\"\"Doc.\n\nmore\"\"\"\nfrom __future__ import annotations\nimport sys; sys.argv = ['s.py', 'a']\nprint(1)\n"
        );
    }

    #[test]
    fn leaves_plain_code_alone() {
        let code = "import sys; sys.argv = ['s.py']\nprint(1)";
        assert_eq!(relocate_argv_line(code), code);
        assert_eq!(relocate_argv_line("print(1)"), "print(1)");
    }
}
