//! Every kind of bad input gets the right status and a JSON error body, and writes nothing.

use pubg1_tests::workload::BINARY;
use pubg1_tests::{create_topic, high_watermarks, BrokerProcess, Client};
use serde_json::json;

/// Small limits so the tests can cross them cheaply.
const LIMITS: [(&str, &str); 4] = [
    ("PUBG1_REQUEST_BODY_BYTES_MAX", "65536"),
    ("PUBG1_PRODUCE_RECORDS_MAX", "100"),
    ("PUBG1_PARTITIONS_PER_TOPIC_MAX", "16"),
    ("PUBG1_FETCH_WAIT_MS_MAX", "5000"),
];

struct Fixture {
    _dir: tempfile::TempDir,
    broker: BrokerProcess,
    http: Client,
}

/// A broker with topic `t` (3 partitions) holding one record in partition 0.
fn fixture() -> anyhow::Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &LIMITS)?;
    let http = Client::new();
    create_topic(&http, &broker, "t", 3)?;
    let reply = http.post_json(
        &broker.url("/topics/t/partitions/0"),
        &json!({"records":[{"value":{"n":1}}]}),
    )?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    Ok(Fixture {
        _dir: dir,
        broker,
        http,
    })
}

impl Fixture {
    fn watermarks(&self) -> Vec<u64> {
        high_watermarks(&self.http, &self.broker, "t").expect("describe t")
    }
    fn topics(&self) -> serde_json::Value {
        self.http
            .get(&self.broker.url("/topics"))
            .expect("list topics")
            .body
    }
}

#[test]
fn bad_produce_requests_are_refused_and_write_nothing() -> anyhow::Result<()> {
    let f = fixture()?;
    let before = f.watermarks();
    assert_eq!(before, vec![1, 0, 0]);
    const JSON: Option<&str> = Some("application/json");
    // One bad request: the expected status and error code, then proof that nothing was written.
    let check = |what: &str, path: &str, content_type: Option<&str>, body: &str, status, code| {
        let reply = f
            .http
            .post(&f.broker.url(path), content_type, body.as_bytes())?;
        reply.assert_error(status, code, what);
        assert_eq!(f.watermarks(), before, "{what}: nothing may be written");
        anyhow::Ok(())
    };
    let good = json!({"records":[{"key":"a","value":1}]}).to_string();
    check(
        "malformed JSON",
        "/topics/t",
        JSON,
        "{\"records\":[",
        400,
        40001,
    )?;
    check(
        "not a produce body",
        "/topics/t",
        JSON,
        "{\"values\":[]}",
        400,
        40001,
    )?;
    check(
        "record with unknown field",
        "/topics/t",
        JSON,
        "{\"records\":[{\"valu\":1}]}",
        400,
        40001,
    )?;
    check(
        "wrong content type",
        "/topics/t",
        Some("text/plain"),
        &good,
        415,
        41501,
    )?;
    check("no content type", "/topics/t", None, &good, 415, 41501)?;
    check("unknown topic", "/topics/nope", JSON, &good, 404, 40401)?;
    check(
        "unknown partition",
        "/topics/t/partitions/3",
        JSON,
        &good,
        404,
        40402,
    )?;
    check(
        "non-numeric partition",
        "/topics/t/partitions/x",
        JSON,
        &good,
        404,
        40402,
    )?;
    let stray = json!({"records":[{"value":1},{"value":2,"partition":9}]}).to_string();
    check(
        "record names unknown partition",
        "/topics/t",
        JSON,
        &stray,
        404,
        40402,
    )?;
    let huge = json!({"records":[{"value": "x".repeat(70_000)}]}).to_string();
    check("body over the limit", "/topics/t", JSON, &huge, 413, 41301)?;
    let too_many = json!({"records": (0..101).map(|i| json!({"value": i})).collect::<Vec<_>>()});
    check(
        "too many records",
        "/topics/t",
        JSON,
        &too_many.to_string(),
        422,
        42202,
    )?;
    check(
        "no records",
        "/topics/t",
        JSON,
        "{\"records\":[]}",
        422,
        42201,
    )?;
    let mixed = json!({"records":[{"value":"aGVsbG8="},{"value":"not base64!"}]}).to_string();
    check(
        "one bad base64 value among good ones",
        "/topics/t",
        Some(BINARY),
        &mixed,
        422,
        42201,
    )?;
    let number = json!({"records":[{"value":12}]}).to_string();
    check(
        "binary value that is not a string",
        "/topics/t",
        Some(BINARY),
        &number,
        422,
        42201,
    )?;
    Ok(())
}

#[test]
fn bad_topic_admin_requests_are_refused_and_create_nothing() -> anyhow::Result<()> {
    let f = fixture()?;
    let topics = f.broker.url("/topics");
    let before = f.topics();
    let long_name = "a".repeat(250);
    let cases = [
        (
            "empty name",
            json!({"name": "", "partitions": 1}),
            422,
            42201,
        ),
        (
            "name '.'",
            json!({"name": ".", "partitions": 1}),
            422,
            42201,
        ),
        (
            "name '..'",
            json!({"name": "..", "partitions": 1}),
            422,
            42201,
        ),
        (
            "name with a space",
            json!({"name": "my topic", "partitions": 1}),
            422,
            42201,
        ),
        (
            "name with a slash",
            json!({"name": "a/b", "partitions": 1}),
            422,
            42201,
        ),
        (
            "name of 250 chars",
            json!({"name": long_name, "partitions": 1}),
            422,
            42201,
        ),
        (
            "zero partitions",
            json!({"name": "z", "partitions": 0}),
            422,
            42201,
        ),
        (
            "partitions over the limit",
            json!({"name": "z", "partitions": 17}),
            422,
            42201,
        ),
        (
            "negative partitions",
            json!({"name": "z", "partitions": -1}),
            400,
            40001,
        ),
        (
            "replication factor above broker count",
            json!({"name": "z", "replication_factor": 3}),
            422,
            42201,
        ),
        (
            "unknown config",
            json!({"name": "z", "configs": {"retention.fortnights": 1}}),
            422,
            42201,
        ),
        (
            "retention.ms not a number",
            json!({"name": "z", "configs": {"retention.ms": "soon"}}),
            422,
            42201,
        ),
        (
            "existing topic",
            json!({"name": "t", "partitions": 1}),
            409,
            40901,
        ),
        (
            "unknown field",
            json!({"name": "z", "partition": 1}),
            400,
            40001,
        ),
    ];
    for (what, body, status, code) in cases {
        f.http
            .post_json(&topics, &body)?
            .assert_error(status, code, what);
        assert_eq!(f.topics(), before, "{what}: nothing may be created");
    }
    f.http
        .post(&topics, Some("text/plain"), b"{\"name\":\"z\"}")?
        .assert_error(415, 41501, "create with wrong content type");
    f.http
        .post(&topics, Some("application/json"), b"name=z")?
        .assert_error(400, 40001, "create with malformed JSON");
    f.http
        .get(&f.broker.url("/topics/nope"))?
        .assert_error(404, 40401, "describe unknown topic");
    f.http
        .delete(&f.broker.url("/topics/nope"))?
        .assert_error(404, 40401, "delete unknown topic");
    assert_eq!(f.topics(), before);
    // 249 characters is allowed, as in Kafka.
    let reply = f
        .http
        .post_json(&topics, &json!({"name": "a".repeat(249)}))?;
    assert_eq!(reply.status, 201, "{}", reply.text);
    Ok(())
}

#[test]
fn bad_fetch_requests_get_clear_errors() -> anyhow::Result<()> {
    let f = fixture()?;
    let records = |query: &str| {
        f.broker
            .url(&format!("/topics/t/partitions/0/records{query}"))
    };
    f.http
        .get(&records("?offset=2"))?
        .assert_error(416, 41601, "offset past the high watermark");
    f.http
        .get(&f.broker.url("/topics/nope/partitions/0/records"))?
        .assert_error(404, 40401, "unknown topic");
    f.http
        .get(&f.broker.url("/topics/t/partitions/7/records"))?
        .assert_error(404, 40402, "unknown partition");
    f.http
        .get(&f.broker.url("/topics/t/partitions/7"))?
        .assert_error(404, 40402, "describe unknown partition");
    f.http
        .get(&records("?offset=abc"))?
        .assert_error(400, 40001, "offset not a number");
    f.http
        .get(&records("?offset=-1"))?
        .assert_error(400, 40001, "negative offset");
    f.http
        .get(&records("?max_records=0"))?
        .assert_error(422, 42201, "max_records 0");
    f.http
        .get(&records("?max_bytes=0"))?
        .assert_error(422, 42201, "max_bytes 0");
    f.http
        .get(&records("?timeout_ms=60000"))?
        .assert_error(422, 42201, "long poll over the limit");
    f.http
        .get(&records("?format=avro"))?
        .assert_error(400, 40001, "unknown format");
    f.http
        .get(&records("?colour=red"))?
        .assert_error(400, 40001, "unknown parameter");
    f.http
        .get(&f.broker.url("/no/such/route"))?
        .assert_error(404, 40400, "unknown route");

    // The high watermark itself is a valid position: an empty answer, not an error.
    let at_end = f.http.get(&records("?offset=1"))?;
    assert_eq!(at_end.status, 200, "{}", at_end.text);
    assert_eq!(at_end.body["records"], json!([]));
    assert_eq!(at_end.body["high_watermark"], 1);

    // Binary data cannot be rendered as JSON: 406 with a hint, and it reads fine as binary.
    let reply = f.http.post(
        &f.broker.url("/topics/t/partitions/1"),
        Some(BINARY),
        br#"{"records":[{"value":"/w=="}]}"#,
    )?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    f.http
        .get(&f.broker.url("/topics/t/partitions/1/records"))?
        .assert_error(406, 40601, "binary record as JSON");
    let binary = f
        .http
        .get_with_accept(&f.broker.url("/topics/t/partitions/1/records"), BINARY)?;
    assert_eq!(binary.status, 200, "{}", binary.text);
    assert_eq!(binary.body["records"][0]["value"], "/w==");
    Ok(())
}
