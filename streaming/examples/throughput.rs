//! Events per second one engine sustains on pre-made 100-byte JSON events, extraction
//! included, for a keyed tumbling count and a hopping sum:
//! `cargo run --release -p pubg1-streaming --example throughput [events]`.

use std::time::Instant;

use pubg1_streaming::extract::{Extraction, Field};
use pubg1_streaming::{Aggregation, EmitMode, Engine, Spec, WindowKind};

/// CPU time of this process so far, in seconds (Linux /proc; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    // 100-byte events: 1,000 sensors, times rising 1 ms per event with jitter, padded.
    let events: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let ts = i as i64 + ((i * 7919) % 50) as i64 - 25;
            let mut text = format!(
                r#"{{"ts":{ts},"sensor":"s{}","reading":{}.{:02},"pad":""#,
                i % 1000,
                i % 97,
                i % 100
            );
            while text.len() < 98 {
                text.push('x');
            }
            text.push_str("\"}");
            text.into_bytes()
        })
        .collect();
    let extraction = Extraction {
        time: Field::Pointer("/ts".into()),
        key: Field::Pointer("/sensor".into()),
        value: Some("/reading".into()),
    };
    for (name, window, aggregation) in [
        (
            "tumbling count 1 s",
            WindowKind::Tumbling { size_ms: 1000 },
            Aggregation::Count,
        ),
        (
            "hopping sum 10 s / 1 s",
            WindowKind::Hopping {
                size_ms: 10_000,
                advance_ms: 1000,
            },
            Aggregation::Sum,
        ),
    ] {
        let spec = Spec {
            window,
            aggregation,
            grace_ms: 100,
            lateness_ms: 0,
            emit: EmitMode::Final,
        };
        let mut engine = Engine::new(spec).expect("spec");
        let (started, cpu) = (Instant::now(), cpu_seconds());
        let mut results = 0usize;
        for value in &events {
            if let Ok(event) = extraction.event(None, Some(value), 0) {
                results += engine.process(event).len();
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu;
        println!(
            "{name:<24} {n} events in {wall:.2} s: {:.0} events/s, {results} results, CPU {:.0}% of one core",
            n as f64 / wall,
            100.0 * cpu / wall
        );
    }
}
