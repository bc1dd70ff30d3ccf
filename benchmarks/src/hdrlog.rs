//! Every counted row's latency samples as an HdrHistogram interval log (`latency.hlog`): one
//! interval per workload, scenario and round, tagged `<workload>/<scenario>/r<round>`, so others
//! can re-plot, merge or compare them with HdrHistogram's own tools (HistogramLogAnalyzer,
//! hdr-plot, `hdrhistogram`'s `IntervalLogIterator`). Values are nanoseconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hdrhistogram::{
    serialization::{
        interval_log::{IntervalLogWriterBuilder, Tag},
        V2DeflateSerializer,
    },
    Histogram,
};

use crate::results::suite::Row;

/// The tag of one row: spaces become `_` (a tag may not hold spaces or commas).
fn tag(r: &Row) -> String {
    format!(
        "{}/{}/r{}",
        r.workload.replace([' ', ','], "_"),
        r.scenario,
        r.round + 1
    )
}

/// The log of `rows` (those with samples and counted: discarded C rows are left out, as in
/// the tables), intervals timed from `started_unix`, the run's start.
pub fn write(rows: &[Row], started_unix: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    let start = UNIX_EPOCH + Duration::from_secs(started_unix);
    let mut log = IntervalLogWriterBuilder::new()
        .add_comment("meshlane-bench: request latency in nanoseconds, one interval per workload/scenario/round")
        .with_start_time(start)
        .with_base_time(start)
        // Java's tools show the max column divided by this: microseconds.
        .with_max_value_divisor(1000.0)
        .begin_log_with(&mut out, &mut serializer)?;
    for r in rows.iter().filter(|r| r.accelerated) {
        let samples = &r.measured.samples_ns;
        if samples.is_empty() {
            continue;
        }
        // 3 significant digits up to an hour, as HdrHistogram's own defaults suggest for latency.
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)?;
        for &ns in samples {
            h.saturating_record(ns.max(1));
        }
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(r.measured.start_unix_s);
        let offset = at.duration_since(start).unwrap_or_default();
        let t = tag(r);
        log.write_histogram(
            &h,
            offset,
            Duration::from_secs_f64(r.measured.wall_s),
            Some(Tag::new(&t).with_context(|| format!("{t:?} is not a valid tag"))?),
        )
        .map_err(|e| anyhow::anyhow!("writing {t}: {e:?}"))?;
    }
    drop(log);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Measured;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    fn row(workload: &str, scenario: &'static str, accelerated: bool, start: f64) -> Row {
        Row {
            scenario,
            round: 0,
            workload: workload.into(),
            measured: Measured {
                samples_ns: vec![1_000, 2_000, 250_000],
                wall_s: 0.5,
                start_unix_s: start,
                ..Measured::default()
            },
            cpu_us_per_req: 0.0,
            counters: None,
            accelerated,
            proof_failures: Vec::new(),
            prog: Vec::new(),
            mode: None,
        }
    }

    #[test]
    fn one_tagged_interval_per_counted_row() {
        let rows = [
            row("tcp 64B x1", "B", true, 1000.25),
            row("tcp 64B x1", "C", false, 1001.0),
            row("http 1KiB x16", "C", true, 1002.5),
        ];
        let log = write(&rows, 1000).unwrap();
        let intervals: Vec<_> = IntervalLogIterator::new(&log)
            .filter_map(|e| match e.unwrap() {
                LogEntry::Interval(i) => Some((
                    i.tag().map(|t| t.as_str().to_string()),
                    i.start_timestamp(),
                    i.max(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(intervals.len(), 2, "the discarded C row is left out");
        assert_eq!(intervals[0].0.as_deref(), Some("tcp_64B_x1/B/r1"));
        assert_eq!(intervals[1].0.as_deref(), Some("http_1KiB_x16/C/r1"));
        assert_eq!(intervals[0].1, Duration::from_millis(250));
        // The max column is in microseconds (divisor 1000): 250 us, to 3 digits.
        assert!((intervals[0].2 - 250.0).abs() < 1.0, "{}", intervals[0].2);
    }
}
