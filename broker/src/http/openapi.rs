//! The OpenAPI document as served: what utoipa derives from the handlers, with this broker's
//! limits written in (they come from its config and cluster size, so they cannot be derive
//! attributes), the binary embedded format's base64 strings, and the topic configs the
//! broker knows. A client generating requests from the document then never sends a request
//! it documents as valid and the broker refuses.

use serde_json::{json, Value};

use crate::config::Config;

/// What the document states about this broker's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub brokers: usize,
    pub partitions_per_topic_max: u32,
    pub produce_records_max: usize,
    pub fetch_records_max: usize,
    pub fetch_bytes_max: usize,
    pub fetch_wait_ms_max: u64,
}

impl Limits {
    pub fn of(config: &Config, brokers: usize) -> Self {
        Self {
            brokers,
            partitions_per_topic_max: config.partitions_per_topic_max,
            produce_records_max: config.produce_records_max,
            fetch_records_max: config.fetch_records_max,
            fetch_bytes_max: config.fetch_bytes_max,
            fetch_wait_ms_max: config.fetch_wait_ms_max,
        }
    }
}

/// Kafka's name rule, for topics, groups and instances.
pub const NAME_PATTERN: &str = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$";

/// Render `doc` with `limits` written in.
pub fn render(doc: &utoipa::openapi::OpenApi, limits: Limits) -> String {
    let mut doc = serde_json::to_value(doc).unwrap_or(Value::Null);
    apply(&mut doc, limits);
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

fn set(value: &mut Value, pointer: &str, fields: Value) {
    if let (Some(Value::Object(target)), Value::Object(fields)) =
        (value.pointer_mut(pointer), fields)
    {
        target.extend(fields);
    }
}

/// A query parameter of an operation.
fn query(doc: &mut Value, path: &str, method: &str, name: &str, fields: Value) {
    let pointer = format!("/paths/{}/{method}/parameters", path.replace('/', "~1"));
    if let Some(Value::Array(parameters)) = doc.pointer_mut(&pointer) {
        for parameter in parameters.iter_mut().filter(|p| p["name"] == name) {
            set(parameter, "/schema", fields.clone());
        }
    }
}

fn apply(doc: &mut Value, limits: Limits) {
    let schemas = "/components/schemas";
    set(
        doc,
        &format!("{schemas}/CreateTopicRequest/properties/name"),
        json!({"pattern": NAME_PATTERN}),
    );
    set(
        doc,
        &format!("{schemas}/CreateTopicRequest/properties/partitions"),
        json!({"minimum": 1, "maximum": limits.partitions_per_topic_max}),
    );
    set(
        doc,
        &format!("{schemas}/CreateTopicRequest/properties/replication_factor"),
        json!({"minimum": 1, "maximum": limits.brokers}),
    );
    // -1 (unbounded) or a positive whole number, as a number or a string.
    let limit = json!({"anyOf": [
        {"type": "integer", "minimum": -1, "maximum": -1},
        {"type": "integer", "minimum": 1, "maximum": i64::MAX},
        {"type": "string", "pattern": r"^\s*(-1|[1-9][0-9]{0,17})\s*$"}
    ]});
    set(
        doc,
        &format!("{schemas}/CreateTopicRequest/properties/configs"),
        json!({
            "properties": {"retention.ms": limit, "retention.bytes": limit},
            "additionalProperties": false
        }),
    );
    set(
        doc,
        &format!("{schemas}/ProduceRequest/properties/records"),
        json!({"maxItems": limits.produce_records_max}),
    );
    set(
        doc,
        &format!("{schemas}/CreateConsumerRequest/properties/name"),
        json!({"pattern": NAME_PATTERN}),
    );
    set(
        doc,
        &format!("{schemas}/CreateConsumerRequest/properties/consumer.request.timeout.ms"),
        json!({"minimum": 0, "maximum": limits.fetch_wait_ms_max}),
    );
    set(
        doc,
        &format!("{schemas}/ProduceRequest/properties/records"),
        json!({"minItems": 1}),
    );
    set(
        doc,
        &format!("{schemas}/CreateConsumerRequest/properties/format"),
        json!({"enum": ["json", "binary", null]}),
    );
    set(
        doc,
        &format!("{schemas}/CreateConsumerRequest/properties/auto.offset.reset"),
        json!({"enum": ["earliest", "latest", "smallest", null]}),
    );
    // A topic list or a pattern: exactly one, not null.
    set(
        doc,
        &format!("{schemas}/SubscriptionRequest"),
        json!({"oneOf": [{"required": ["topics"]}, {"required": ["topic_pattern"]}]}),
    );
    set(
        doc,
        &format!("{schemas}/SubscriptionRequest/properties/topics"),
        json!({"type": "array"}),
    );
    set(
        doc,
        &format!("{schemas}/SubscriptionRequest/properties/topic_pattern"),
        json!({"type": "string"}),
    );
    // Bodies these operations may go without: create with defaults, commit everything
    // consumed, read the committed offsets of everything assigned.
    for (path, method) in [
        ("/consumers/{group}", "post"),
        ("/consumers/{group}/instances/{instance}/offsets", "post"),
        ("/consumers/{group}/instances/{instance}/offsets", "get"),
    ] {
        let pointer = format!("/paths/{}/{method}/requestBody", path.replace('/', "~1"));
        set(doc, &pointer, json!({"required": false}));
    }
    // The binary format's keys and values are base64 strings (or null).
    let mut binary = doc
        .pointer(&format!("{schemas}/ProduceRecord"))
        .cloned()
        .unwrap_or(Value::Null);
    let base64 = json!({"type": ["string", "null"], "format": "byte",
        "description": "Base64 of the bytes; null or absent: none."});
    set(
        &mut binary,
        "/properties",
        json!({"key": base64, "value": base64}),
    );
    let mut binary_request = doc
        .pointer(&format!("{schemas}/ProduceRequest"))
        .cloned()
        .unwrap_or(Value::Null);
    set(
        &mut binary_request,
        "/properties/records/items",
        json!({"$ref": "#/components/schemas/BinaryProduceRecord"}),
    );
    set(
        doc,
        schemas,
        json!({"BinaryProduceRecord": binary, "BinaryProduceRequest": binary_request}),
    );
    for path in ["/topics/{topic}", "/topics/{topic}/partitions/{partition}"] {
        let pointer = format!(
            "/paths/{}/post/requestBody/content/application~1vnd.kafka.binary.v2+json/schema",
            path.replace('/', "~1")
        );
        if let Some(schema) = doc.pointer_mut(&pointer) {
            *schema = json!({"$ref": "#/components/schemas/BinaryProduceRequest"});
        }
    }
    // Partition numbers below the most partitions a topic may have.
    let partition_max = json!({"maximum": limits.partitions_per_topic_max.saturating_sub(1)});
    for schema in [
        "ProduceRecord",
        "BinaryProduceRecord",
        "PartitionRef",
        "OffsetRef",
    ] {
        set(
            doc,
            &format!("{schemas}/{schema}/properties/partition"),
            partition_max.clone(),
        );
    }
    let paths: Vec<String> = doc["paths"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for path in paths.iter().filter(|p| p.contains("{partition}")) {
        for method in ["get", "post", "delete"] {
            let pointer = format!("/paths/{}/{method}/parameters", path.replace('/', "~1"));
            if let Some(Value::Array(parameters)) = doc.pointer_mut(&pointer) {
                for parameter in parameters.iter_mut().filter(|p| p["name"] == "partition") {
                    set(parameter, "/schema", partition_max.clone());
                }
            }
        }
    }
    // Records sent to a partition by path carry no partition of their own.
    for (record, request) in [
        ("ProduceRecord", "ProduceRequest"),
        ("BinaryProduceRecord", "BinaryProduceRequest"),
    ] {
        let mut without = doc
            .pointer(&format!("{schemas}/{record}"))
            .cloned()
            .unwrap_or(Value::Null);
        if let Some(Value::Object(properties)) = without.pointer_mut("/properties") {
            properties.remove("partition");
        }
        let mut list = doc
            .pointer(&format!("{schemas}/{request}"))
            .cloned()
            .unwrap_or(Value::Null);
        set(
            &mut list,
            "/properties/records/items",
            json!({"$ref": format!("#/components/schemas/Partition{record}")}),
        );
        set(
            doc,
            schemas,
            json!({format!("Partition{record}"): without, format!("Partition{request}"): list}),
        );
        let route = "/topics/{topic}/partitions/{partition}".replace('/', "~1");
        let content = doc.pointer_mut(&format!("/paths/{route}/post/requestBody/content"));
        if let Some(Value::Object(content)) = content {
            for media in content.values_mut() {
                let name = media["schema"]["$ref"]
                    .as_str()
                    .and_then(|r| r.rsplit('/').next())
                    .map(str::to_owned);
                if name.as_deref() == Some(request) {
                    media["schema"] =
                        json!({"$ref": format!("#/components/schemas/Partition{request}")});
                }
            }
        }
    }
    // Idempotent produce needs the partition path (sequences are per partition).
    for request in ["ProduceRequest", "BinaryProduceRequest"] {
        if let Some(Value::Object(properties)) =
            doc.pointer_mut(&format!("{schemas}/{request}/properties"))
        {
            for field in ["producer_id", "producer_epoch", "sequence"] {
                properties.remove(field);
            }
        }
    }
    let fetch = "/topics/{topic}/partitions/{partition}/records";
    query(
        doc,
        fetch,
        "get",
        "max_records",
        json!({"minimum": 1, "maximum": limits.fetch_records_max}),
    );
    query(
        doc,
        fetch,
        "get",
        "max_bytes",
        json!({"minimum": 1, "maximum": limits.fetch_bytes_max}),
    );
    query(
        doc,
        fetch,
        "get",
        "timeout_ms",
        json!({"maximum": limits.fetch_wait_ms_max}),
    );
    let poll = "/consumers/{group}/instances/{instance}/records";
    query(
        doc,
        poll,
        "get",
        "max_bytes",
        json!({"minimum": 1, "maximum": limits.fetch_bytes_max}),
    );
    query(
        doc,
        poll,
        "get",
        "timeout",
        json!({"maximum": limits.fetch_wait_ms_max}),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_land_where_the_handlers_check_them() {
        let config = Config::default();
        let (app, doc) = actix_web::App::new()
            .into_utoipa_app()
            .openapi(<super::super::ApiDoc as utoipa::OpenApi>::openapi())
            .service(super::super::topics::create)
            .service(super::super::records::fetch)
            .service(super::super::produce::to_topic)
            .split_for_parts();
        drop(app);
        let rendered: Value =
            serde_json::from_str(&render(&doc, Limits::of(&config, 3))).expect("JSON");
        let create = &rendered["components"]["schemas"]["CreateTopicRequest"]["properties"];
        assert_eq!(
            create["partitions"]["maximum"],
            config.partitions_per_topic_max
        );
        assert_eq!(create["replication_factor"]["maximum"], 3);
        assert_eq!(create["name"]["pattern"], NAME_PATTERN);
        let binary = &rendered["paths"]["/topics/{topic}"]["post"]["requestBody"]["content"]
            ["application/vnd.kafka.binary.v2+json"]["schema"]["$ref"];
        assert_eq!(binary, "#/components/schemas/BinaryProduceRequest");
        let params = rendered["paths"]["/topics/{topic}/partitions/{partition}/records"]["get"]
            ["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let max_records = params.iter().find(|p| p["name"] == "max_records");
        assert_eq!(
            max_records.map(|p| p["schema"]["maximum"].clone()),
            Some(json!(config.fetch_records_max))
        );
    }

    use utoipa_actix_web::AppExt;
}
