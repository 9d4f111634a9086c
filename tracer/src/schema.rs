//! `droptrace schema`: the JSON Schema of every record droptrace writes,
//! in captures and in `--json` output. It is generated from the very types
//! the capture reader deserializes, so it cannot drift from the reader.
use anyhow::Result;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Value};

use crate::{
    contract::{
        CountersRecord, Header, Line, Notice, QueuesRecord, Record, SummaryRecord, FORMAT,
        FORMAT_VERSION,
    },
    report::ReportJson,
};

/// One `{"type": NAME, ...T}` record.
fn record<T: JsonSchema>(generator: &mut SchemaGenerator, name: &str) -> Value {
    json!({
        "allOf": [
            {"properties": {"type": {"const": name}}, "required": ["type"]},
            generator.subschema_for::<T>(),
        ]
    })
}

pub fn document() -> Value {
    let mut generator = SchemaGenerator::default();
    // In the order of Record::TYPES; every variant of Record but Unknown.
    let records = vec![
        record::<Header>(&mut generator, Record::TYPES[0]),
        record::<Line>(&mut generator, Record::TYPES[1]),
        record::<Notice>(&mut generator, Record::TYPES[2]),
        record::<CountersRecord>(&mut generator, Record::TYPES[3]),
        record::<QueuesRecord>(&mut generator, Record::TYPES[4]),
        record::<SummaryRecord>(&mut generator, Record::TYPES[5]),
    ];
    // `droptrace report --json` prints one of these: in $defs.
    generator.subschema_for::<ReportJson>();
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("https://droptrace.invalid/schema/{FORMAT}/{FORMAT_VERSION}"),
        "title": format!("droptrace records, {FORMAT} format_version {FORMAT_VERSION}"),
        "description": "Each line of a capture (`droptrace record`) and of `droptrace --json` is one of these records, told apart by \"type\". A capture starts with a header (format, format_version) and ends with a summary; a capture without its summary was cut short. Times are RFC 3339 in UTC. `droptrace report --json` prints one object described by $defs/ReportJson.",
        "type": "object",
        "oneOf": records,
        "$defs": generator.take_definitions(true),
    })
}

pub fn print() -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&document())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_type_is_described_with_its_fields() {
        let schema = document();
        let names: Vec<&str> = schema["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r["allOf"][0]["properties"]["type"]["const"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            names,
            ["header", "drop", "notice", "counters", "queues", "summary"]
        );
        let defs = &schema["$defs"];
        let required = |name: &str| -> Vec<String> {
            serde_json::from_value(defs[name]["required"].clone()).unwrap()
        };
        assert!(required("Line").contains(&"count".to_string()));
        assert!(required("Line").contains(&"kind".to_string()));
        assert!(required("Header").contains(&"format_version".to_string()));
        assert!(required("SummaryRecord").contains(&"totals".to_string()));
        let kinds: Vec<&str> = defs["DropKind"]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|k| k["const"].as_str())
            .collect();
        assert_eq!(kinds.len(), 7, "{}", defs["DropKind"]);
        assert!(kinds.contains(&"unix_backlog") && kinds.contains(&"ephemeral_ports"));
    }
}
