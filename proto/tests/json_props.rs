//! Hostile HTTP JSON bodies: arbitrary bytes, arbitrary JSON documents built from the
//! real field names, and mutated valid bodies parse into every request body (and every
//! reply the CLI parses) as a value or a clean error, never a panic; what parses
//! serializes and parses back to the same value. The coverage-guided version is
//! `fuzz/` (target `api_json`, `scripts/fuzz.sh`).

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Value};
use swarm_proto::api::{
    AddNode, CreateSwarm, ErrorBody, NodeStatus, StatusView, SubmitBatch, SubmitResponse,
    SubmitTask, SwarmList, TaskList, TaskState, TaskView,
};
use swarm_testkit::config;
use swarm_testkit::text::{apply, Edit};

/// Field names of the bodies, so that generated documents hit real fields with wrong
/// values as well as unknown ones.
const FIELDS: &[&str] = &[
    "agent",
    "swarm",
    "payload",
    "payload_base64",
    "priority",
    "timeout_ms",
    "max_attempts",
    "idempotency_key",
    "labels",
    "patterns",
    "retain_ms",
    "tasks",
    "id",
    "raft_addr",
    "api_addr",
    "voter",
    "pattern_dimension",
    "name",
    "topology",
    "fan_out",
    "max_degree",
    "stages",
    "queue_depth",
    "allow_empty",
    "state",
    "attempts",
    "attempt",
    "worker",
    "started_at_ms",
    "output",
    "output_base64",
    "created_at_ms",
    "error",
    "code",
    "message",
    "next_after",
    "swarms",
    "duplicate",
    "task",
];

/// Whether two JSON documents are the same, floats within a relative 1e-15: serde_json
/// parses floats with best-effort precision (its `float_roundtrip` feature is off), so a
/// float may come back one unit in the last place off.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// Parses `body` as `T`: a clean result, and a parsed value serializes to JSON that
/// parses to the same value.
fn check<T: Serialize + DeserializeOwned>(body: &[u8]) -> Result<Option<T>, TestCaseError> {
    let Ok(v) = serde_json::from_slice::<T>(body) else {
        return Ok(None);
    };
    let text = serde_json::to_string(&v).expect("a parsed body serializes");
    let back: T = serde_json::from_str(&text).expect("its JSON parses again");
    let (a, b) = (
        serde_json::to_value(&v).unwrap(),
        serde_json::to_value(&back).unwrap(),
    );
    prop_assert!(
        same(&a, &b),
        "JSON round trip changed the value: {} vs {}",
        a,
        b
    );
    Ok(Some(v))
}

/// Every body type the server parses from a request, and every reply the CLI parses.
fn check_all(body: &[u8]) -> Result<(), TestCaseError> {
    if let Some(t) = check::<SubmitTask>(body)? {
        let _ = t.payload_bytes();
    }
    if let Some(b) = check::<SubmitBatch>(body)? {
        for t in &b.tasks {
            let _ = t.payload_bytes();
        }
    }
    check::<AddNode>(body)?;
    check::<CreateSwarm>(body)?;
    check::<TaskView>(body)?;
    check::<TaskList>(body)?;
    check::<ErrorBody>(body)?;
    check::<SwarmList>(body)?;
    check::<SubmitResponse>(body)?;
    check::<NodeStatus>(body)?;
    check::<StatusView>(body)?;
    if let Ok(s) = std::str::from_utf8(body) {
        if let Some(st) = TaskState::parse(s) {
            prop_assert_eq!(st.as_str(), s);
        }
    }
    Ok(())
}

/// A short string of any characters (cheaper to draw than a regex or `any::<String>()`).
fn short() -> impl Strategy<Value = String> + Clone {
    prop::collection::vec(any::<char>(), 0..8).prop_map(|v| v.into_iter().collect())
}

/// A short lower-case word.
fn word() -> impl Strategy<Value = String> + Clone {
    prop::collection::vec(prop::char::range('a', 'z'), 0..8).prop_map(|v| v.into_iter().collect())
}

fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        3 => prop::sample::select(FIELDS).prop_map(str::to_string),
        1 => word(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        (-(1i64 << 30)..(1i64 << 30)).prop_map(|k| json!(k as f64 / 1024.0)),
        short().prop_map(Value::String),
        prop::sample::select(vec![
            "echo",
            "aGk=",
            "/wA=",
            "***",
            "ring",
            "succeeded",
            "a[k=v]"
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn submit_task() -> impl Strategy<Value = SubmitTask> {
    (
        word(),
        prop::option::of(word()),
        prop::option::of(json_value()),
        prop::option::of(prop_oneof![
            prop::sample::select(vec!["aGk=", "/wA=", "", "a", "aGk", "***", "aGk=\n"])
                .prop_map(str::to_string),
            short()
        ]),
        any::<i32>(),
        prop::option::of(any::<u64>()),
        prop::option::of(any::<u32>()),
        prop::option::of(short()),
        prop::collection::btree_map(word(), word(), 0..3),
        any::<u32>(),
        prop::option::of(any::<u64>()),
    )
        .prop_flat_map(|fields| {
            (
                Just(fields),
                prop::collection::vec(any::<u64>(), 0..3),
                prop::option::of(short()),
                prop::option::of(short()),
                any::<bool>(),
                prop::option::of(any::<u64>()),
                prop::option::of(short()),
            )
        })
        .prop_map(
            |(
                (
                    agent,
                    swarm,
                    payload,
                    payload_base64,
                    priority,
                    timeout_ms,
                    max_attempts,
                    idempotency_key,
                    labels,
                    patterns,
                    retain_ms,
                ),
                depends_on,
                concurrency_key,
                rate_limit,
                requires_approval,
                approval_timeout_ms,
                callback_url,
            )| SubmitTask {
                agent,
                swarm,
                // `null` is read back as no payload.
                payload: payload.filter(|p| !p.is_null()),
                payload_base64,
                priority,
                timeout_ms,
                max_attempts,
                idempotency_key,
                labels,
                patterns,
                retain_ms,
                depends_on,
                concurrency_key,
                rate_limit,
                requires_approval,
                approval_timeout_ms,
                callback_url,
            },
        )
}

fn create_swarm() -> impl Strategy<Value = CreateSwarm> {
    (
        word(),
        prop::sample::select(vec!["star", "mesh", "ring", "hierarchical", "x"]),
        prop::collection::btree_map(word(), word(), 0..3),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u32>()),
        prop::collection::vec(
            prop::sample::select(vec!["a", "b[k=v]", "c[k=v,x=y]", "d[", "[]", ""]),
            0..3,
        )
        .prop_map(|v| v.into_iter().map(str::to_string).collect()),
        prop::option::of(any::<u32>()),
        any::<bool>(),
    )
        .prop_map(
            |(name, topology, labels, fan_out, max_degree, stages, queue_depth, allow_empty)| {
                CreateSwarm {
                    name,
                    topology: topology.into(),
                    labels,
                    fan_out,
                    max_degree,
                    stages,
                    queue_depth,
                    allow_empty,
                }
            },
        )
}

/// A valid body of some request type, as JSON text.
fn valid_body() -> impl Strategy<Value = String> {
    prop_oneof![
        submit_task().prop_map(|t| serde_json::to_string(&t).unwrap()),
        prop::collection::vec(submit_task(), 0..3)
            .prop_map(|tasks| serde_json::to_string(&SubmitBatch { tasks }).unwrap()),
        (any::<u64>(), any::<bool>(), prop::option::of(any::<usize>())).prop_map(|(id, voter, d)| {
            serde_json::to_string(&AddNode {
                id,
                raft_addr: "127.0.0.1:7000".into(),
                api_addr: "127.0.0.1:8000".into(),
                voter,
                pattern_dimension: d,
            })
            .unwrap()
        }),
        create_swarm().prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just(
            r#"{"id":1,"agent":"echo","state":"succeeded","priority":0,"timeout_ms":1000,"max_attempts":3,"created_at_ms":1,"attempts":[{"attempt":1,"worker":"w","started_at_ms":2,"outcome":"succeeded"}],"payload":"hi","output_base64":"/wA=","swarm":"default"}"#
                .to_string()
        ),
    ]
}

/// Text edits with the characters a JSON parser trips on.
fn edit() -> impl Strategy<Value = Edit> {
    swarm_testkit::text::edits(&[
        '{', '}', '[', ']', '"', ':', ',', '\\', '-', '0', '9', 'e', '.', 'n', 't', ' ', '\u{0}',
        '\u{feff}', 'é',
    ])
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_bytes_parse_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        check_all(&bytes)?;
    }

    #[test]
    fn arbitrary_documents_parse_cleanly(doc in json_value()) {
        check_all(serde_json::to_string(&doc).unwrap().as_bytes())?;
    }

    #[test]
    fn mutated_bodies_parse_cleanly(
        body in valid_body(),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let text = apply(&body, &edits);
        check_all(text.as_bytes())?;
    }

    #[test]
    fn valid_bodies_round_trip(task in submit_task(), swarm in create_swarm()) {
        let text = serde_json::to_string(&task).unwrap();
        prop_assert!(check::<SubmitTask>(text.as_bytes())?.is_some());
        // The payload the agent gets does not depend on the JSON trip.
        let back: SubmitTask = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(back.payload_bytes().is_ok(), task.payload_bytes().is_ok());
        if task.payload.as_ref().is_none_or(|p| p.is_string()) {
            prop_assert_eq!(back.payload_bytes(), task.payload_bytes());
        }
        let text = serde_json::to_string(&swarm).unwrap();
        prop_assert_eq!(serde_json::from_str::<CreateSwarm>(&text).unwrap(), swarm);
    }

    #[test]
    fn unknown_request_fields_are_refused(task in submit_task(), key in word().prop_map(|w| w + "_x")) {
        let mut doc = serde_json::to_value(&task).unwrap();
        doc.as_object_mut().unwrap().insert(key.clone(), json!(1));
        prop_assert!(serde_json::from_value::<SubmitTask>(doc.clone()).is_err());
        let batch = json!({ "tasks": [doc] });
        prop_assert!(serde_json::from_value::<SubmitBatch>(batch).is_err());
        let mut node = json!({"id": 1, "raft_addr": "a", "api_addr": "b"});
        node.as_object_mut().unwrap().insert(key, json!(true));
        prop_assert!(serde_json::from_value::<AddNode>(node).is_err());
    }

    #[test]
    fn payload_base64_never_panics(
        b64 in prop_oneof![short(), prop::collection::vec(prop::sample::select(b"AZaz09+/=-_ \n".to_vec()), 0..24).prop_map(|v| String::from_utf8(v).unwrap())],
        payload in prop::option::of(json_value()),
    ) {
        let t = SubmitTask {
            agent: "echo".into(),
            payload_base64: Some(b64),
            ..SubmitTask::default()
        };
        let _ = t.payload_bytes();
        let t = SubmitTask { payload, ..t };
        let _ = t.payload_bytes();
    }
}

#[test]
fn deeply_nested_bodies_are_refused_not_a_stack_overflow() {
    for depth in [200, 10_000, 100_000] {
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!("{}1{}", r#"{"payload":"#.repeat(depth), "}".repeat(depth));
        let in_payload = format!(r#"{{"agent":"echo","payload":{arrays}}}"#);
        for body in [&arrays, &objects, &in_payload] {
            check_all(body.as_bytes()).unwrap();
            assert!(serde_json::from_str::<SubmitTask>(body).is_err());
        }
    }
}

#[test]
fn large_but_flat_bodies_parse() {
    let tasks: Vec<Value> = (0..2000)
        .map(|i| json!({"agent": "echo", "payload": {"i": i}, "labels": {"k": "v"}}))
        .collect();
    let body = serde_json::to_vec(&json!({ "tasks": tasks })).unwrap();
    let b: SubmitBatch = serde_json::from_slice(&body).unwrap();
    assert_eq!(b.tasks.len(), 2000);
    let labels: BTreeMap<String, String> = BTreeMap::from([("k".into(), "v".into())]);
    assert!(b.tasks.iter().all(|t| t.labels == labels));
}
