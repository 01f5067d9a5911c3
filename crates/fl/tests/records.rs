//! `metrics.jsonl` is an interface (docs/metrics.schema.json): a round record with every field
//! filled has exactly the schema's keys, of the schema's types.

use std::collections::BTreeMap;

use fedhubert_fl::privacy::PrivacyRecord;
use fedhubert_fl::{Failure, RoundRecord};
use serde_json::Value;

fn schema() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/metrics.schema.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every key of `obj` is a property of `schema` with its type, and every required one is there.
fn check(obj: &Value, schema: &Value, at: &str, skip: &[&str]) {
    let props = schema["properties"].as_object().unwrap();
    let obj = obj.as_object().unwrap();
    for (k, v) in obj {
        let p = props
            .get(k)
            .unwrap_or_else(|| panic!("{at}{k} is not in the schema"));
        let want = p["type"].as_str().unwrap();
        let got = type_of(v);
        assert!(
            got == want || (want == "number" && got == "integer"),
            "{at}{k}: {got}, schema {want}"
        );
        if want == "object" && p.get("properties").is_some() {
            check(v, p, &format!("{at}{k}."), &[]);
        }
    }
    for r in schema["required"].as_array().unwrap() {
        assert!(
            obj.contains_key(r.as_str().unwrap()),
            "{at}{r} is required but not written"
        );
    }
    for k in props.keys() {
        assert!(
            obj.contains_key(k) || skip.contains(&k.as_str()),
            "{at}{k} is in the schema but never written"
        );
    }
}

#[test]
fn a_round_record_has_the_documented_keys_and_types() {
    let rec = RoundRecord {
        round: 3,
        sampled: vec![0, 1],
        participated: vec![0],
        failures: vec![Failure {
            client: 1,
            attempt: 0,
            why: "lost".into(),
        }],
        attempts: 1,
        train: BTreeMap::from([("loss".into(), 4.2)]),
        eval: BTreeMap::from([("loss".into(), 4.3)]),
        num_examples: 10,
        bytes_down: 100,
        bytes_up: 90,
        client_bytes: BTreeMap::from([(0, (100, 90))]),
        round_time_s: 1.5,
        lr: (1e-4, 2e-4),
        server_eval: BTreeMap::from([("acc_masked".into(), 0.1)]),
        privacy: Some(PrivacyRecord {
            epsilon: 1.5,
            delta: 1e-5,
            noise_multiplier: 1.1,
            clipping_norm: 1.0,
            next_clipping_norm: 1.1,
            denominator: 2.0,
            replied: 1,
            attempts_accounted: 3,
            unclipped_fraction: Some(0.5),
        }),
    };
    let v = serde_json::to_value(&rec).unwrap();
    check(&v, &schema(), "", &[]);
}
