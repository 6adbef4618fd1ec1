//! Publishing the server's counters to CloudWatch, which the Sleep function reads to
//! decide whether the server is idle.
//!
//! Every period (60 s) the server puts ActiveTunnels, ActiveStreams, BytesIn and BytesOut
//! (bytes moved since the previous sample) and LastActivity (seconds since the last use)
//! in the namespace and under the dimension the control plane defines. A failed put is
//! logged and the next period tries again: losing a sample must never stop the server.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fluidity_aws::clients::cloudwatch::{CloudWatchClient, MetricDatum};
use fluidity_aws::control::types::{METRIC_ACTIVE_TUNNELS, METRIC_PERIOD};
use fluidity_aws::control::ServerId;
use futures_lite::FutureExt;

use crate::health::{Metrics, MetricsSnapshot};

/// Byte counters of the previous sample, to publish deltas.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Previous {
    bytes_in: u64,
    bytes_out: u64,
}

/// The data of one sample, and the byte counters to remember for the next.
pub fn sample(
    snap: &MetricsSnapshot,
    prev: Previous,
    id: &ServerId,
    at: SystemTime,
) -> (Vec<MetricDatum>, Previous) {
    let dims = id.metric_dimensions();
    let datum = |name: &str, value: u64, unit: &str| MetricDatum {
        name: name.to_owned(),
        value: value as f64,
        unit: unit.to_owned(),
        dimensions: dims.clone(),
        timestamp: Some(at),
    };
    let data = vec![
        datum(METRIC_ACTIVE_TUNNELS, snap.tunnels_active, "Count"),
        datum("ActiveStreams", snap.streams_active, "Count"),
        // A counter reset (never expected: they only grow) is published as 0, not as a
        // huge wrapped number.
        datum(
            "BytesIn",
            snap.bytes_in.saturating_sub(prev.bytes_in),
            "Bytes",
        ),
        datum(
            "BytesOut",
            snap.bytes_out.saturating_sub(prev.bytes_out),
            "Bytes",
        ),
        datum("LastActivity", snap.idle_seconds, "Seconds"),
    ];
    let next = Previous {
        bytes_in: snap.bytes_in,
        bytes_out: snap.bytes_out,
    };
    (data, next)
}

/// Publishes one sample to `namespace` now; returns the counters to remember.
pub async fn publish_once(
    cw: &CloudWatchClient,
    namespace: &str,
    metrics: &Metrics,
    id: &ServerId,
    prev: Previous,
) -> Previous {
    let (data, next) = sample(&metrics.snapshot(), prev, id, SystemTime::now());
    let (cw, ns) = (cw.clone(), namespace.to_owned());
    let result = blocking::unblock(move || cw.put_metric_data(&ns, &data)).await;
    match result {
        Ok(()) => {
            tracing::debug!(server = %id, "metrics published to CloudWatch");
            next
        }
        Err(e) => {
            tracing::warn!(server = %id, error = %e, "cannot publish metrics to CloudWatch");
            // The bytes of this period are carried into the next sample.
            prev
        }
    }
}

/// Publishes a sample to `namespace` at once and then every `period` (the control plane's 60 s unless a
/// test shortens it) until `shutdown` completes.
pub async fn publish_loop(
    cw: CloudWatchClient,
    namespace: String,
    metrics: Arc<Metrics>,
    id: ServerId,
    period: Option<Duration>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let period = period.unwrap_or(METRIC_PERIOD);
    let publishing = async {
        let mut prev = Previous::default();
        loop {
            prev = publish_once(&cw, &namespace, &metrics, &id, prev).await;
            async_io::Timer::after(period).await;
        }
    };
    publishing.or(shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluidity_aws::control::types::METRIC_DIMENSION;

    #[test]
    fn samples_carry_deltas_and_the_dimension() {
        let m = Arc::new(Metrics::new());
        let id = ServerId::new("fluidity", "tunnel");
        let _t = m.track_tunnel();
        m.add_bytes_in(100);
        m.add_bytes_out(300);
        let (data, prev) = sample(&m.snapshot(), Previous::default(), &id, SystemTime::now());
        let get = |d: &[MetricDatum], n: &str| d.iter().find(|x| x.name == n).unwrap().value;
        assert_eq!(get(&data, METRIC_ACTIVE_TUNNELS), 1.0);
        assert_eq!(get(&data, "BytesIn"), 100.0);
        assert_eq!(get(&data, "BytesOut"), 300.0);
        assert!(data
            .iter()
            .all(|d| d.dimensions
                == vec![(METRIC_DIMENSION.to_owned(), "fluidity/tunnel".to_owned())]));
        m.add_bytes_in(5);
        let (data, _) = sample(&m.snapshot(), prev, &id, SystemTime::now());
        assert_eq!(get(&data, "BytesIn"), 5.0);
        assert_eq!(get(&data, "BytesOut"), 0.0);
    }
}
