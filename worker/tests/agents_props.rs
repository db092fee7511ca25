//! Hostile agents files: arbitrary text and mutated valid files parse, through the public
//! `Agents::parse`, to agents or a clean error, never a panic; what parses keeps the
//! built-ins and only holds usable agents. Only the public parse API is used, so the
//! test holds while the file's schema grows. The coverage-guided version is `fuzz/`
//! (target `agents_toml`, `scripts/fuzz.sh`).

use std::path::Path;

use proptest::prelude::*;
use swarm_testkit::config;
use swarm_testkit::text::{apply, Edit};
use swarm_worker::{Agent, Agents};

const FILE: &str = "/etc/swarm/agents.toml";

/// Parses `text`: a clean result, and if it parses, the built-ins are there and every
/// `exec` agent has a name and a command.
fn check(text: &str) -> Result<Option<Agents>, TestCaseError> {
    for path in [FILE, "agents.toml", ""] {
        let Ok(agents) = Agents::parse(text, Path::new(path)) else {
            continue;
        };
        let names = agents.names();
        prop_assert!(
            names.windows(2).all(|w| w[0] < w[1]),
            "names not sorted: {:?}",
            names
        );
        for builtin in ["echo", "sleep"] {
            prop_assert!(
                matches!(agents.get(builtin), Some(Agent::Echo | Agent::Sleep)),
                "built-in {} missing or replaced",
                builtin
            );
        }
        for name in &names {
            prop_assert!(!name.is_empty() && !name.chars().any(char::is_whitespace));
            match agents.get(name) {
                Some(Agent::Exec(spec)) => {
                    prop_assert!(!spec.command.trim().is_empty());
                    prop_assert!(spec.timeout_ms != Some(0));
                    prop_assert!(spec.env.keys().all(|k| !k.is_empty() && !k.contains('=')));
                    if let Some(cwd) = &spec.cwd {
                        // Relative directories are resolved against the file's.
                        if Path::new(path).is_absolute() {
                            prop_assert!(cwd.is_absolute(), "{}", cwd.display());
                        }
                    }
                }
                Some(_) => {}
                None => prop_assert!(false, "listed agent {} is missing", name),
            }
        }
        if path == FILE {
            return Ok(Some(agents));
        }
    }
    Ok(None)
}

/// A string of up to `n` characters from `alphabet` (cheaper to draw than a regex).
fn from(alphabet: &'static str, n: usize) -> impl Strategy<Value = String> + Clone {
    let chars: Vec<char> = alphabet.chars().collect();
    prop::collection::vec(prop::sample::select(chars), 0..=n).prop_map(|v| v.into_iter().collect())
}

const WORD: &str = "abcdefghijklmnopqrstuvwxyz";
const NAME: &str = "abcdefghijklmnopqrstuvwxyz0123456789_-";

fn toml_string() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        from("abcXYZ019_./- ", 12),
        prop::collection::vec(any::<char>(), 0..12).prop_map(|v| v.into_iter().collect()),
        Just(String::new()),
        Just("  ".into()),
        Just("a=b".into()),
        Just("\u{0}".into()),
    ]
}

/// TOML basic-string literal of `s`.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An agents file: random agents with every key, some of them invalid.
fn agents_file() -> impl Strategy<Value = String> {
    let env_name = prop_oneof![
        from("ABCxyz_09", 6),
        Just("SWARM_TOKEN".to_string()),
        Just("A=B".to_string()),
        toml_string()
    ];
    let agent = (
        prop_oneof![
            from(NAME, 8),
            Just("echo".to_string()),
            Just("has space".to_string()),
            toml_string()
        ],
        prop::option::of(toml_string()),
        prop::collection::vec(toml_string(), 0..3),
        // `env`: a list of names to pass on, or the older table of fixed values.
        prop_oneof![
            Just(None),
            prop::collection::vec(env_name.clone(), 0..3).prop_map(|n| Some(Err(n))),
            prop::collection::btree_map(env_name.clone(), toml_string(), 0..3)
                .prop_map(|m| Some(Ok(m))),
        ],
        prop::collection::btree_map(env_name, toml_string(), 0..3),
        prop::option::of(prop::sample::select(vec![
            "root",
            "nobody",
            "0:0",
            "65534:65534",
            "1:x",
            ":",
            "no-such-user",
            "",
        ])),
        prop::option::of(prop_oneof![from("ab/.", 8), toml_string()]),
        prop::option::of(prop_oneof![
            Just(0i64),
            Just(-1),
            Just(i64::MAX),
            1i64..100_000
        ]),
        prop::option::of(prop::sample::select(vec!["foo", "Command", "envs", "user"])),
    );
    prop::collection::vec(agent, 0..4).prop_map(|agents| {
        let mut out = String::new();
        for (name, command, args, env, env_set, run_as, cwd, timeout, unknown) in agents {
            out.push_str(&format!("[agents.{}]\n", quoted(&name)));
            if let Some(c) = command {
                out.push_str(&format!("command = {}\n", quoted(&c)));
            }
            let args: Vec<String> = args.iter().map(|a| quoted(a)).collect();
            out.push_str(&format!("args = [{}]\n", args.join(", ")));
            let table = |m: &std::collections::BTreeMap<String, String>| {
                let items: Vec<String> = m
                    .iter()
                    .map(|(k, v)| format!("{} = {}", quoted(k), quoted(v)))
                    .collect();
                format!("{{ {} }}", items.join(", "))
            };
            match env {
                None => {}
                Some(Err(names)) => {
                    let names: Vec<String> = names.iter().map(|n| quoted(n)).collect();
                    out.push_str(&format!("env = [{}]\n", names.join(", ")));
                }
                Some(Ok(fixed)) => out.push_str(&format!("env = {}\n", table(&fixed))),
            }
            if !env_set.is_empty() {
                out.push_str(&format!("env_set = {}\n", table(&env_set)));
            }
            if let Some(r) = run_as {
                out.push_str(&format!("run_as = {}\n", quoted(r)));
            }
            if let Some(c) = cwd {
                out.push_str(&format!("cwd = {}\n", quoted(&c)));
            }
            if let Some(t) = timeout {
                out.push_str(&format!("timeout_ms = {t}\n"));
            }
            if let Some(k) = unknown {
                out.push_str(&format!("{k} = 1\n"));
            }
        }
        out
    })
}

/// Text edits with the characters a TOML parser trips on.
fn edit() -> impl Strategy<Value = Edit> {
    swarm_testkit::text::edits(&[
        '[', ']', '{', '}', '"', '\'', '=', ',', '.', '\n', '#', '\\', '0', '-', ' ', '\u{0}',
    ])
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_text_parses_cleanly(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn generated_files_parse_cleanly(file in agents_file()) {
        check(&file)?;
    }

    #[test]
    fn mutated_files_parse_cleanly(
        file in agents_file(),
        edits in prop::collection::vec(edit(), 1..5),
    ) {
        check(&apply(&file, &edits))?;
    }

    #[test]
    fn valid_agents_are_loaded_as_written(
        names in prop::collection::btree_set(
            (prop::sample::select(WORD.chars().collect::<Vec<_>>()), from(NAME, 8))
                .prop_map(|(c, rest)| format!("{c}{rest}")),
            0..4,
        ),
        command in (prop::sample::select(vec!['/', 'a', 'z']), from("abz019/._-", 12))
            .prop_map(|(c, rest)| format!("{c}{rest}")),
        timeout in prop::option::of(1u64..1_000_000),
    ) {
        let names: Vec<String> = names.into_iter().filter(|n| n != "echo" && n != "sleep").collect();
        let mut file = String::new();
        for n in &names {
            file.push_str(&format!("[agents.{n}]\ncommand = {}\ncwd = \"work\"\n", quoted(&command)));
            if let Some(t) = timeout {
                file.push_str(&format!("timeout_ms = {t}\n"));
            }
        }
        let agents = check(&file)?.expect("a valid file parses");
        prop_assert_eq!(agents.names().len(), names.len() + 2);
        for n in &names {
            match agents.get(n) {
                Some(Agent::Exec(spec)) => {
                    prop_assert_eq!(&spec.command, &command);
                    prop_assert_eq!(spec.timeout_ms, timeout);
                    prop_assert_eq!(spec.cwd.as_deref(), Some(Path::new("/etc/swarm/work")));
                }
                other => prop_assert!(false, "{} is {:?}", n, other),
            }
        }
    }
}

#[test]
fn deeply_nested_files_are_refused_not_a_stack_overflow() {
    for depth in [100, 10_000, 100_000] {
        let arrays = format!("x = {}{}", "[".repeat(depth), "]".repeat(depth));
        let tables = format!("x = {}{}", "{a = ".repeat(depth), "}".repeat(depth));
        let dotted = format!("[agents.{}]\ncommand = \"x\"\n", vec!["a"; depth].join("."));
        let in_agent = format!(
            "[agents.a]\ncommand = \"x\"\nargs = {}{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        for text in [arrays, tables, dotted, in_agent] {
            assert!(
                Agents::parse(&text, Path::new(FILE)).is_err(),
                "depth {depth} parsed"
            );
        }
    }
}
