//! The crate's modules have a direction: the crate docs (`src/lib.rs`) list them top to
//! bottom, and each module may use only modules below it. This test reads that list and
//! every `src/*.rs`, collects the `crate::...` paths each module's code names (comments
//! and literals left out), and fails on any path to a module above (the crate root
//! included), so a cycle cannot come back unnoticed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The line of the crate docs that the list follows.
const LIST_HEAD: &str = "Modules, top to bottom";

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The modules named in the crate docs' list, top to bottom: the first `name` of each
/// `//! * ` item after [`LIST_HEAD`].
fn layering(lib: &str) -> Vec<String> {
    let mut lines = lib.lines().skip_while(|l| !l.contains(LIST_HEAD));
    assert!(
        lines.next().is_some(),
        "src/lib.rs's docs have no \"{LIST_HEAD}\" list"
    );
    let mut names = Vec::new();
    for line in lines {
        let Some(doc) = line.strip_prefix("//!") else {
            break;
        };
        if let Some(item) = doc.strip_prefix(" * ") {
            let name = item
                .strip_prefix('`')
                .and_then(|rest| rest.split_once('`'))
                .map(|(name, _)| name.to_owned())
                .unwrap_or_else(|| panic!("list item without a `module` name: {line}"));
            names.push(name);
        } else if !doc.starts_with("   ") {
            break; // neither an item nor its continuation: the list is over
        }
    }
    names
}

/// `code` with comments (doc comments too), string and char literals blanked out, so
/// that only what the compiler resolves is left; line breaks are kept.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
        } else if c == 'r'
            && (i == 0
                || !ident(chars[i - 1])
                || (chars[i - 1] == 'b' && (i < 2 || !ident(chars[i - 2]))))
            && matches!(next, Some('"' | '#'))
            && chars[i + 1..].iter().find(|&&c| c != '#') == Some(&'"')
        {
            // A raw string r#"..."#: it ends at a quote followed by as many hashes.
            let hashes = chars[i + 1..].iter().take_while(|&&c| c == '#').count();
            i += 2 + hashes;
            while i < chars.len() {
                if chars[i] == '"'
                    && chars[i + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&c| c == '#')
                        .count()
                        == hashes
                {
                    i += 1 + hashes;
                    break;
                }
                blank(&mut out, chars[i]);
                i += 1;
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if let Some(&c) = chars.get(i) {
                    blank(&mut out, c);
                }
                i += 1;
            }
            i += 1;
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal, '\n', '\'' or '\u{..}'.
            i += 3;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            i += 3; // 'x'; anything else after a quote is a lifetime or a label
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// What each `crate::` path in `code` names first: a module, or (for an item of the
/// crate root, `crate::{self}` included) `lib`. Also every `super::` other than the
/// `use super::*;` of an inline test module, whose meaning depends on where it is.
/// Returned with the line it is on.
fn references(code: &str, modules: &[String]) -> (Vec<(usize, String)>, Vec<usize>) {
    let resolve = |name: &str| {
        if modules.iter().any(|m| m == name) && name != "lib" {
            name.to_owned()
        } else {
            "lib".to_owned()
        }
    };
    let squeezed: Vec<(usize, char)> = code
        .lines()
        .enumerate()
        .flat_map(|(n, line)| line.chars().map(move |c| (n + 1, c)).chain([(n + 1, ' ')]))
        .collect();
    let chars: Vec<char> = squeezed.iter().map(|(_, c)| *c).collect();
    let word_at = |at: usize, word: &str| {
        let w: Vec<char> = word.chars().collect();
        chars.get(at..at + w.len()) == Some(&w[..])
            && (at == 0
                || !(chars[at - 1].is_alphanumeric()
                    || chars[at - 1] == '_'
                    || chars[at - 1] == '$'))
    };
    let skip_ws = |mut at: usize| {
        while chars.get(at).is_some_and(|c| c.is_whitespace()) {
            at += 1;
        }
        at
    };
    let ident_at = |at: usize| -> String {
        chars[at..]
            .iter()
            .take_while(|c| c.is_alphanumeric() || **c == '_')
            .collect()
    };
    let mut found = Vec::new();
    let mut supers = Vec::new();
    for at in 0..chars.len() {
        let line = squeezed[at].0;
        if word_at(at, "super") {
            let rest: String = chars[at..]
                .iter()
                .take(16)
                .filter(|c| !c.is_whitespace())
                .collect();
            let mut previous: Vec<char> = chars[..at]
                .iter()
                .rev()
                .skip_while(|c| c.is_whitespace())
                .take_while(|c| c.is_alphanumeric() || **c == '_')
                .copied()
                .collect();
            previous.reverse();
            if previous != ['u', 's', 'e'] || !rest.starts_with("super::*;") {
                supers.push(line);
            }
            continue;
        }
        if !word_at(at, "crate") {
            continue;
        }
        let after = skip_ws(at + "crate".len());
        if chars.get(after..after + 2) != Some(&[':', ':']) {
            continue; // pub(crate)
        }
        let at = skip_ws(after + 2);
        if chars.get(at) == Some(&'{') {
            // use crate::{a, b::{..}, C}: the first name of each top-level entry.
            let mut depth = 0;
            let mut entry_start = true;
            for (j, &c) in chars.iter().enumerate().skip(at) {
                match c {
                    '{' => {
                        depth += 1;
                        entry_start = depth == 1;
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => entry_start = true,
                    c if entry_start && depth == 1 && (c.is_alphanumeric() || c == '_') => {
                        found.push((squeezed[j].0, resolve(&ident_at(j))));
                        entry_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.push((line, resolve(&ident_at(at))));
        }
    }
    (found, supers)
}

#[test]
fn each_module_uses_only_modules_below_it() {
    let src = src_dir();
    let lib = read(&src.join("lib.rs"));
    let order = layering(&lib);
    assert_eq!(
        order.first().map(String::as_str),
        Some("lib"),
        "the list starts with the crate root, `lib`"
    );

    // The list names every module, exactly once: each `mod x;` of lib.rs, and each
    // src/*.rs file but main.rs (the binary, which uses the crate from outside).
    let listed: BTreeSet<&str> = order.iter().map(String::as_str).collect();
    assert_eq!(
        listed.len(),
        order.len(),
        "a module is listed twice: {order:?}"
    );
    let declared: BTreeSet<String> = code_only(&lib)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l
                .strip_prefix("pub(crate) ")
                .or_else(|| l.strip_prefix("pub "))
                .unwrap_or(l);
            l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned)
        })
        .chain(["lib".to_owned()])
        .collect();
    let files: BTreeSet<String> = std::fs::read_dir(&src)
        .expect("src/")
        .map(|entry| entry.expect("src/ entry").path())
        .map(|path| {
            assert!(
                path.extension().is_some_and(|e| e == "rs"),
                "{}: this test reads src/*.rs only; nested modules need it extended",
                path.display()
            );
            path.file_stem()
                .expect("a file name")
                .to_string_lossy()
                .into_owned()
        })
        .filter(|stem| stem != "main")
        .collect();
    let listed: BTreeSet<String> = listed.into_iter().map(str::to_owned).collect();
    assert_eq!(
        listed, declared,
        "the list in lib.rs's docs and lib.rs's `mod`s differ"
    );
    assert_eq!(
        listed, files,
        "the list in lib.rs's docs and the files in src/ differ"
    );

    let mut upward = Vec::new();
    let mut seen = 0;
    for (rank, module) in order.iter().enumerate() {
        let code = code_only(&read(&src.join(format!("{module}.rs"))));
        let (found, supers) = references(&code, &order);
        for line in supers {
            upward.push(format!(
                "src/{module}.rs:{line}: `super::` (write `crate::...` paths)"
            ));
        }
        for (line, used) in found {
            seen += 1;
            let used_rank = order
                .iter()
                .position(|m| *m == used)
                .expect("a listed module");
            if used_rank < rank {
                upward.push(format!(
                    "src/{module}.rs:{line}: uses `{used}`, which is above `{module}`"
                ));
            }
        }
    }
    assert!(
        seen > 20,
        "found only {seen} crate:: paths: is the scan broken?"
    );
    assert!(
        upward.is_empty(),
        "modules must use only modules below them in lib.rs's list:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_scan_sees_paths_in_code_only() {
    let modules: Vec<String> = ["lib", "api", "state"].map(str::to_owned).to_vec();
    let source = r##"
//! Docs name [`crate::api`] and [`crate::Auth`]: not code.
use crate::state::{Shared, State};
use crate::{Credential, api::{self, handle}};
pub(crate) fn f<'a>(x: &'a str) -> char {
    let _ = "crate::api in a string";
    let _ = r#"crate::api in a raw "string""#;
    /* crate::api in a /* nested */ block comment */
    let _ = crate::api::handle;
    '"'
}
#[cfg(test)]
mod tests {
    use super::*;
}
"##;
    let (found, supers) = references(&code_only(source), &modules);
    assert_eq!(
        found,
        [
            (3, "state".to_owned()),
            (4, "lib".to_owned()),
            (4, "api".to_owned()),
            (9, "api".to_owned()),
        ]
    );
    assert!(supers.is_empty());
    let (_, supers) = references(&code_only("fn g() { super::h() }\n"), &modules);
    assert_eq!(supers, [1]);
}
