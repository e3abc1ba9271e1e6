//! Reads the sources of the agent, the lab harness and the tests for the external
//! programs they start, and checks each against [`REQUIREMENTS`]: a test that starts a
//! program set-up does not install fails here, on any machine, instead of only on a
//! fresh one.
//!
//! The reader is lexical: it tokenizes Rust (comments, strings, raw strings and char
//! literals handled) and recognises the shapes in which this code base spells a
//! command line:
//! - the first argument of `Command::new("p")`, `words_in("p", ..)`, `run("p", ..)`,
//!   `run_ok("p", ..)`, `run_cmd("p", ..)`;
//! - the first element of an array or `vec!` literal in a statement that starts a
//!   process (`Cmd`, `Command`, `run_in`, `spawn`, `Capture`, ...) or whose other
//!   elements include a flag (`["iperf3", "-s", ..]`);
//! - the program after `"exec", <namespace>,` (`ip netns exec NS p`) and after
//!   `"timeout", <duration>,`;
//! - the first word of each command of a shell script given to `sh -c` or to a helper
//!   named `sh`;
//! - the plugins named in a `const *_CNI_PLUGINS` list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::requirements::{Need, REQUIREMENTS};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Str(String),
    /// An identifier or path (`Command::new`), a macro name keeps its `!` (`vec!`).
    Ident(String),
    Punct(char),
}

/// What the sources start: programs, and CNI plugins they name.
#[derive(Debug, Default, PartialEq, Eq)]
struct Started {
    programs: BTreeSet<String>,
    cni_plugins: BTreeSet<String>,
}

fn tokenize(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
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
                    i += 1;
                }
            }
        } else if c == '"' {
            let (text, end) = quoted(&chars, i + 1);
            tokens.push(Token::Str(text));
            i = end;
        } else if (c == 'r' || c == 'b') && raw_string_start(&chars, i).is_some() {
            let (hashes, open) = raw_string_start(&chars, i).expect("checked");
            let close: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            let mut end = open;
            while end < chars.len() && !chars[end..].starts_with(&close) {
                end += 1;
            }
            tokens.push(Token::Str(
                chars[open..end.min(chars.len())].iter().collect(),
            ));
            i = end + close.len();
        } else if c == 'b' && next == Some('"') {
            let (text, end) = quoted(&chars, i + 2);
            tokens.push(Token::Str(text));
            i = end;
        } else if c == '\'' {
            // A char literal ('x', '\n', '"') or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric()
                    || chars[i] == '_'
                    || (chars[i] == ':' && chars.get(i + 1) == Some(&':'))
                    || (chars[i] == ':' && i > 0 && chars[i - 1] == ':'))
            {
                i += 1;
            }
            if chars.get(i) == Some(&'!') && chars.get(i + 1) != Some(&'=') {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    tokens
}

/// The text of a string literal whose body starts at `start`; returns it and the index
/// after the closing quote. Escapes are kept as written except `\"` and `\\`.
fn quoted(chars: &[char], start: usize) -> (String, usize) {
    let mut text = String::new();
    let mut i = start;
    while i < chars.len() && chars[i] != '"' {
        if chars[i] == '\\' && i + 1 < chars.len() {
            match chars[i + 1] {
                '"' | '\\' => text.push(chars[i + 1]),
                'n' => text.push('\n'),
                other => {
                    text.push('\\');
                    text.push(other);
                }
            }
            i += 2;
        } else {
            text.push(chars[i]);
            i += 1;
        }
    }
    (text, i + 1)
}

/// For `r"`, `r#"`, `br#"` at `i`: the number of `#` and the index of the body.
fn raw_string_start(chars: &[char], i: usize) -> Option<(usize, usize)> {
    if i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_') {
        return None;
    }
    let mut j = i;
    if chars[j] == 'b' {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let mut hashes = 0;
    while chars.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    (chars.get(j) == Some(&'"')).then_some((hashes, j + 1))
}

/// Calls whose first argument, when it is a literal, is the program.
const PROGRAM_FIRST: &[&str] = &[
    "Command::new",
    "words_in",
    "run",
    "run_ok",
    "run_cmd",
    "output",
];
/// Names that mark a statement as starting a process.
const STARTERS: &[&str] = &[
    "Command", "Cmd", "run", "run_in", "run_cmd", "run_ok", "words_in", "spawn", "Capture",
    "output", "status",
];

fn is_flag(word: &str) -> bool {
    word.len() > 1 && word.starts_with('-') && !word[1..].starts_with(|c: char| c.is_ascii_digit())
}

fn looks_like_program(word: &str) -> bool {
    let name = word
        .strip_prefix('/')
        .map_or(word, |_| word.rsplit('/').next().unwrap_or(""));
    !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.+".contains(c))
}

fn scan(source: &str) -> Started {
    let tokens = tokenize(source);
    let mut started = Started::default();
    let mut add = |word: &str| {
        if looks_like_program(word) {
            started.programs.insert(word.to_string());
        }
    };
    // `const *_CNI_PLUGINS: [&str; N] = [..];` (its type holds a `;` of its own).
    for (k, token) in tokens.iter().enumerate() {
        if matches!(token, Token::Ident(name) if name.ends_with("CNI_PLUGINS")) {
            let value = tokens[k..]
                .iter()
                .skip_while(|t| **t != Token::Punct('='))
                .take_while(|t| **t != Token::Punct(';'));
            started.cni_plugins.extend(value.filter_map(|t| match t {
                Token::Str(s) => Some(s.clone()),
                _ => None,
            }));
        }
    }
    for statement in tokens.split(|t| matches!(t, Token::Punct(';'))) {
        let starts_process = statement.iter().any(|t| match t {
            Token::Ident(name) => {
                let last = name.rsplit("::").next().unwrap_or(name);
                STARTERS.contains(&last) || STARTERS.contains(&name.as_str())
            }
            _ => false,
        });
        let literals = |from: usize| {
            statement[from..].iter().filter_map(|t| match t {
                Token::Str(s) => Some(s.as_str()),
                _ => None,
            })
        };
        for (k, token) in statement.iter().enumerate() {
            match token {
                Token::Ident(name) if PROGRAM_FIRST.contains(&name.as_str()) => {
                    if let (Some(Token::Punct('(')), Some(Token::Str(program))) =
                        (statement.get(k + 1), statement.get(k + 2))
                    {
                        add(program);
                    }
                }
                Token::Ident(name)
                    if name == "sh" && statement.get(k + 1) == Some(&Token::Punct('(')) =>
                {
                    if let Some(script) = literals(k + 1).next() {
                        shell_commands(script).for_each(&mut add);
                    }
                }
                Token::Punct('[') if is_array_literal(statement, k) => {
                    let elements = array_elements(&statement[k + 1..]);
                    if let Some(Token::Str(first)) = elements.first() {
                        let flagged = elements[1..]
                            .iter()
                            .any(|t| matches!(t, Token::Str(s) if is_flag(s)));
                        if starts_process || flagged {
                            add(first);
                        }
                    }
                }
                Token::Str(word) if word == "exec" => {
                    // `exec`, the namespace (any expression), `,`, the program.
                    let mut rest = statement[k + 1..]
                        .iter()
                        .skip_while(|t| **t == Token::Punct(','));
                    let after_namespace = rest.by_ref().position(|t| *t == Token::Punct(','));
                    if let (Some(_), Some(Token::Str(program))) = (after_namespace, rest.next()) {
                        add(program);
                    }
                }
                // A command line goes on with literals (`"timeout", "5", ..`); a match arm
                // (`X => "timeout", Y => "parse"`) does not.
                Token::Str(word)
                    if word == "timeout"
                        && matches!(
                            (statement.get(k + 1), statement.get(k + 2)),
                            (Some(Token::Punct(',')), Some(Token::Str(_)))
                        ) =>
                {
                    if let Some(program) = literals(k + 1)
                        .find(|w| !is_flag(w) && !w.starts_with(|c: char| c.is_ascii_digit()))
                    {
                        add(program);
                    }
                }
                Token::Str(word) if word == "-c" => {
                    let before: Vec<&str> = statement[..k]
                        .iter()
                        .rev()
                        .filter_map(|t| match t {
                            Token::Str(s) => Some(s.as_str()),
                            _ => None,
                        })
                        .take(1)
                        .collect();
                    if before == ["sh"] {
                        if let Some(script) = literals(k + 1).next() {
                            shell_commands(script).for_each(&mut add);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    started
}

/// `[` opens an array literal (not an index) when it follows `vec!` or a token that
/// cannot end an expression.
fn is_array_literal(statement: &[Token], k: usize) -> bool {
    // `.args([..])` continues a command line begun elsewhere: its first element is an
    // argument, not a program.
    let before: Vec<&Token> = statement[..k]
        .iter()
        .rev()
        .filter(|t| **t != Token::Punct('&'))
        .take(2)
        .collect();
    if let [Token::Punct('('), Token::Ident(name)] = before.as_slice() {
        if name == "args" || name == "arg" {
            return false;
        }
    }
    if continues_a_command_line(statement, k) {
        return false;
    }
    match k.checked_sub(1).and_then(|p| statement.get(p)) {
        None => true,
        // Not `in`: `for x in [..]` iterates over values, it starts nothing.
        Some(Token::Ident(name)) => name.ends_with('!') || name == "return",
        Some(Token::Punct(c)) => !matches!(c, ')' | ']' | '?'),
        Some(Token::Str(_)) => false,
    }
}

/// An array inside the arguments of a method call (`lab.etcdctl(&["get", ..])`,
/// `lab.tshark(ns, iface, &["-Y", ..])`) or of a call whose first argument already named
/// the program (`run_ok("nft", &["list", ..])`) holds arguments, not a program.
fn continues_a_command_line(statement: &[Token], k: usize) -> bool {
    let mut depth = 0;
    for open in (0..k).rev() {
        match &statement[open] {
            Token::Punct(')' | ']' | '}') => depth += 1,
            Token::Punct('[' | '{') if depth > 0 => depth -= 1,
            Token::Punct('(') if depth > 0 => depth -= 1,
            Token::Punct('[' | '{') => return false,
            Token::Punct('(') => {
                let Some(Token::Ident(callee)) = open.checked_sub(1).map(|p| &statement[p]) else {
                    return false;
                };
                let method = open >= 2 && statement[open - 2] == Token::Punct('.');
                let program_named = PROGRAM_FIRST.contains(&callee.as_str())
                    && matches!(statement.get(open + 1), Some(Token::Str(_)));
                return program_named || (method && !STARTERS.contains(&callee.as_str()));
            }
            _ => {}
        }
    }
    false
}

/// The first-level elements of an array whose body starts the slice: each element's
/// first token (enough to tell a literal from an expression).
fn array_elements(body: &[Token]) -> Vec<Token> {
    let mut elements = Vec::new();
    let mut depth = 0;
    let mut at_element_start = true;
    for token in body {
        match token {
            Token::Punct('[' | '(' | '{') => {
                if depth == 0 && at_element_start {
                    elements.push(token.clone());
                    at_element_start = false;
                }
                depth += 1;
            }
            Token::Punct(']' | ')' | '}') if depth == 0 => break,
            Token::Punct(']' | ')' | '}') => depth -= 1,
            Token::Punct(',') if depth == 0 => at_element_start = true,
            Token::Punct('&') if depth == 0 && at_element_start => {}
            _ if depth == 0 && at_element_start => {
                elements.push(token.clone());
                at_element_start = false;
            }
            _ => {}
        }
    }
    elements
}

const SHELL_BUILTINS: &[&str] = &[
    "exec", "then", "do", "if", "umask", "cd", "export", "set", "trap", "echo",
];

/// The first word of every command in a shell script (split on `;`, `|`, `&&`, `||`).
fn shell_commands(script: &str) -> impl Iterator<Item = &str> {
    script
        .split([';', '|', '&', '\n'])
        .filter_map(|command| {
            // Leading `NAME=value` words set the environment; builtins start nothing.
            command.split_whitespace().find(|word| !word.contains('='))
        })
        .filter(|word| !SHELL_BUILTINS.contains(word))
}

/// The binaries this repository builds: started by the tests, installed by nobody.
const OWN_PROGRAMS: &[&str] = &[
    // A name no machine has: the agent's unit test of a missing tool.
    "weft-no-such-tool",
    "weft",
    "weft-cni",
    "weft-apiserver",
    "weft-bench",
    "weft-demo",
    "flannel",
];

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && path.file_name().is_some_and(|n| n != "target") {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_reader_finds_programs_in_every_shape_this_code_base_uses() {
    let source = r##"
        // Command::new("in-a-comment")
        let x = '"';
        let a = Command::new("alpha").args(["netns", "exec", ns, "bravo", "-c", "1"]).output();
        let line = vec!["charlie".to_string(), "-s".into(), addr];
        run_in(&self.ns, &["delta", "x"])?;
        let y = json["dst"]["echo"];
        let z = Cmd::new(["timeout", "-k", "1", "8", "foxtrot", "-i"]).run();
        sh(ns, "golf list | hotel -n 1; india=1 juliet");
        Command::new("ip").args(["netns", "exec", &pod.ns, "timeout", "5", "kilo"]).status();
        let why = match reason { Reason::Timeout => "timeout", Reason::Parse => "parse" };
        run_ok("lima", &["--version"], None);
        const STANDARD_CNI_PLUGINS: [&str; 2] = ["mike", "november"];
        let r = r#"raw "oscar" string"#;
        let json = ["papa", "quebec"];
        Command::new("sh").arg("-c").arg("romeo && exec \"$@\"");
    "##;
    let started = scan(source);
    let expected: BTreeSet<String> = [
        "alpha", "bravo", "charlie", "delta", "foxtrot", "golf", "hotel", "juliet", "ip", "kilo",
        "lima", "sh", "romeo", "timeout",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(started.programs, expected);
    assert_eq!(
        started.cni_plugins,
        ["mike", "november"].into_iter().map(String::from).collect()
    );
}

#[test]
fn every_program_the_agent_and_the_tests_start_is_in_the_requirements() {
    let root = crate::workspace_root();
    let mut files = Vec::new();
    for dir in ["agent", "tests"] {
        rust_sources(&root.join(dir), &mut files);
    }
    assert!(
        files.len() > 20,
        "found only {} sources under agent/ and tests/",
        files.len()
    );

    let listed = |wanted: &str, cni: bool| {
        REQUIREMENTS.iter().any(|r| match r.need {
            Need::CniPlugin(name) => cni && name == wanted,
            Need::Program(name) | Need::File(name) if !cni => {
                name == wanted || name.rsplit('/').next() == wanted.rsplit('/').next()
            }
            _ => false,
        })
    };
    let mut unlisted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for file in &files {
        let source = std::fs::read_to_string(file).unwrap();
        let started = scan(&source);
        let relative = file
            .strip_prefix(root)
            .unwrap_or(file)
            .display()
            .to_string();
        for program in &started.programs {
            seen.insert(program.clone());
            if !OWN_PROGRAMS.contains(&program.as_str()) && !listed(program, false) {
                unlisted
                    .entry(program.clone())
                    .or_default()
                    .insert(relative.clone());
            }
        }
        for plugin in &started.cni_plugins {
            if !listed(plugin, true) {
                unlisted
                    .entry(format!("CNI plugin {plugin}"))
                    .or_default()
                    .insert(relative.clone());
            }
        }
    }
    // The reader must see the lab's everyday tools, or it has gone blind.
    for known in ["ip", "iperf3", "tshark", "etcdctl", "nft", "sockperf"] {
        assert!(
            seen.contains(known),
            "the reader no longer finds {known}: {seen:?}"
        );
    }
    assert!(
        unlisted.is_empty(),
        "programs started by the sources but missing from xtask/src/requirements.rs \
         (add each with the Debian package that provides it):\n{}",
        unlisted
            .iter()
            .map(|(program, files)| format!(
                "  {program}: {}",
                files.iter().cloned().collect::<Vec<_>>().join(", ")
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
