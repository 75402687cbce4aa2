//! The terminal summary of a run.

use std::fmt::Write as _;

use crate::run::RunResult;
use crate::verify::Verdict;

pub fn render(result: &RunResult) -> String {
    let mut out = String::new();
    let p = &result.publish_latency_ms;
    let _ = writeln!(out, "scenario            {}", result.scenario);
    let _ = writeln!(
        out,
        "load                {:.1} s on {} brokers, topic {}, over {}",
        result.duration_s,
        result.brokers,
        result.topic,
        if result.protocol.is_empty() {
            "http"
        } else {
            &result.protocol
        }
    );
    let _ = writeln!(
        out,
        "acknowledged        {} records ({:.0} records/s), {} requests ok, {} failed",
        result.records_acknowledged,
        result.records_per_second,
        result.requests_ok,
        result.requests_failed
    );
    let _ = writeln!(
        out,
        "publish latency     p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        p.p50, p.p90, p.p99, p.p999, p.max
    );
    if let Some(e) = &result.end_to_end_latency_ms {
        let _ = writeln!(
            out,
            "end-to-end latency  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  ({} records consumed)",
            e.p50, e.p90, e.p99, e.p999, e.max, result.records_consumed
        );
    }
    if !result.faults.is_empty() {
        let _ = writeln!(
            out,
            "faults              at        unavailable: first failure → first success"
        );
        for w in &result.faults {
            let unavailable = w.describe();
            let _ = writeln!(
                out,
                "  {:<40} {:>6.1} s  {unavailable}",
                w.fault,
                w.at_ms as f64 / 1000.0
            );
        }
    }
    for check in &result.checks {
        let _ = writeln!(out, "check               {check}");
    }
    if let Some(seed) = result.seed {
        let _ = writeln!(
            out,
            "nemesis seed        {seed} ({} fault steps; rerun: loadgen chaos --seed {seed} --faults {}{})",
            result.faults.len(),
            result.faults.len(),
            if result.protocol == "kafka" { " --protocol kafka" } else { "" }
        );
    }
    if !result.rss_max_bytes.is_empty() {
        let list: Vec<String> = result
            .rss_max_bytes
            .iter()
            .map(|(id, bytes)| format!("broker {id} {:.0} MB", *bytes as f64 / 1e6))
            .collect();
        let _ = writeln!(out, "resident memory max  {}", list.join(", "));
    }
    for replica in &result.replicas {
        let _ = writeln!(
            out,
            "replica             {}: {} stored, {} lost, {} duplicated, {} moved, {}",
            replica.broker,
            replica.stored,
            replica.lost,
            replica.duplicated,
            replica.moved,
            if replica.identical_to_first {
                "identical to the first copy"
            } else {
                "DIFFERS from the first copy"
            }
        );
    }
    out.push_str(&verdict(&result.verdict));
    if let Some(group) = &result.group {
        out.push_str(&group_summary(group));
    }
    if let Some(stream) = &result.stream {
        out.push_str(&stream_summary(stream));
    }
    if !result
        .replicas
        .iter()
        .all(crate::readback::ReplicaCheck::is_clean)
    {
        out.push_str("result              FAIL: a replica lacks, repeats or misplaces acknowledged records, or differs\n");
    }
    out
}

pub fn verdict(v: &Verdict) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "verifier            {} acknowledged, {} stored: {} lost, {} duplicated, {} moved, {} reordered, {} stored unacknowledged",
        v.acknowledged, v.stored, v.lost, v.duplicated, v.moved, v.reordered, v.unacknowledged_stored
    );
    for example in &v.examples {
        let _ = writeln!(out, "  {example}");
    }
    let _ = writeln!(
        out,
        "result              {}",
        if v.is_clean() {
            "PASS: every acknowledged record is stored once, where it was acknowledged"
        } else {
            "FAIL: acknowledged records were lost, duplicated or moved"
        }
    );
    out
}

fn stream_summary(s: &crate::stream::StreamResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "stream {:<12} {} events acknowledged, {} lost from the input; {} late, {} dropped as later than grace",
        s.job, s.events_acknowledged, s.events_lost, s.late_records, s.dropped_records
    );
    for (at_ms, victim, back) in &s.takeovers {
        let back = back.map_or_else(|| "never".to_owned(), |ms| format!("{ms} ms"));
        let _ = writeln!(
            out,
            "  kill -9 of its broker {victim} at {:.1} s: running elsewhere after {back}",
            *at_ms as f64 / 1000.0
        );
    }
    let _ = writeln!(
        out,
        "stream verifier     {} windows recomputed, {} written ({} output records): {} missing, {} duplicated, {} wrong, {} unexpected{}",
        s.windows_recomputed,
        s.windows_written,
        s.output_records,
        s.missing,
        s.duplicated,
        s.wrong,
        s.unexpected,
        if s.drained { "" } else { "; the job did not finish within drain_s" }
    );
    if !s.copies_identical {
        out.push_str("  the brokers' copies of the output hold different results\n");
    }
    if !s.counts_match {
        out.push_str("  the job's late or dropped count differs from the recomputation's\n");
    }
    for example in &s.examples {
        let _ = writeln!(out, "  {example}");
    }
    let _ = writeln!(
        out,
        "result              {}",
        if s.is_clean() {
            "PASS: the job's output equals the recomputation of its input, every window once"
        } else {
            "FAIL: the job's output differs from the recomputation of its input"
        }
    );
    out
}

fn group_summary(g: &crate::group::GroupResult) -> String {
    let mut out = String::new();
    let v = &g.verdict;
    let c = &g.commit_latency_ms;
    let _ = writeln!(
        out,
        "group {:<13} {} members joined, {} instances; {} records delivered ({:.0}/s from first to last, {:.0}/s during the load); all read {}",
        g.group,
        g.members_joined,
        g.incarnations,
        v.delivered,
        g.read_records_per_second,
        g.records_per_second_during_load,
        g.drained_after_ms.map_or_else(
            || "NEVER (not every acknowledged record was read)".to_owned(),
            |ms| format!("{ms} ms after the load")
        )
    );
    let _ = writeln!(
        out,
        "commits             {} ok, refused {:?}; latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        g.commits_ok, g.commits_refused, c.p50, c.p99, c.max
    );
    for r in &g.rebalances {
        let _ = writeln!(
            out,
            "  {:<40} {:>6.1} s  {} partitions moved, stable again {}, their reading resumed {}",
            r.event,
            r.at_ms as f64 / 1000.0,
            r.partitions_moved,
            r.stable_after_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("after {ms} ms")),
            match (r.resumed_median_ms, r.resumed_after_ms) {
                (Some(median), Some(last)) =>
                    format!("after {median} ms (median), {last} ms (last)"),
                _ => "-".to_owned(),
            }
        );
    }
    let _ = writeln!(
        out,
        "group verifier      {} undelivered, {} committed then redelivered, {} two owners, {} twice to one member, {} commits seen going back; redelivered {} (member killed {}, instance lost {}, rebalance {})",
        v.undelivered,
        v.committed_redelivered,
        v.two_owners,
        v.delivered_twice_to_one_member,
        v.committed_backwards,
        v.redelivered(),
        v.redelivered_member_killed,
        v.redelivered_instance_lost,
        v.redelivered_rebalance
    );
    for example in &v.examples {
        let _ = writeln!(out, "  {example}");
    }
    let _ = writeln!(
        out,
        "result              {}",
        if g.is_clean() {
            "PASS: the group received every acknowledged record, never two owners at once, commits never went back"
        } else {
            "FAIL: the group missed acknowledged records, read a partition twice at once, or saw commits go back"
        }
    );
    out
}
