//! Prometheus metrics over HTTP (`--metrics ADDR` on `dds brick` and `dds meta`): the
//! text exposition format, encoded by `prometheus-client` from values gathered afresh
//! at each scrape (`Sample`s), so nothing on the data path is shared or locked for it.
//! A bottom-layer module: the brick and the authority hand it their samples.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use dds_transport::auth::Secret;

use crate::proto::{Histogram, HISTOGRAM_BUCKETS};

/// Labels of one series: name and value pairs.
pub type Labels = Vec<(&'static str, String)>;

/// One metric family as gathered for a scrape: its name (without `_total`), help, and
/// its series.
#[derive(Debug)]
pub struct Sample {
    pub name: &'static str,
    pub help: &'static str,
    pub value: Value,
}

#[derive(Debug)]
pub enum Value {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, i64)>),
    /// Durations in microseconds, exposed in seconds.
    Histogram(Vec<(Labels, Histogram)>),
    /// Counts (records in a batch), exposed as they are.
    Counts(Vec<(Labels, Histogram)>),
}

/// A histogram of counts, not of durations.
struct Counted(Histogram);

/// What a scrape encodes: the samples of one gathering.
#[derive(Debug)]
struct Gathered(Vec<Sample>);

struct Series<'a, T>(&'a T);

impl EncodeMetric for Series<'_, u64> {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(self.0, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

impl EncodeMetric for Series<'_, i64> {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(self.0)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

impl EncodeMetric for Series<'_, Counted> {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &self.0 .0;
        let buckets: Vec<(f64, u64)> = (0..HISTOGRAM_BUCKETS).map(|i| (Histogram::bound_us(i).map_or(f64::MAX, |n| n as f64), h.buckets[i])).collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum_us as f64, h.buckets.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl EncodeMetric for Series<'_, Histogram> {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = self.0;
        let buckets: Vec<(f64, u64)> = (0..HISTOGRAM_BUCKETS)
            .map(|i| (Histogram::bound_us(i).map_or(f64::MAX, |us| us as f64 / 1e6), h.buckets[i]))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum_us as f64 / 1e6, h.buckets.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn family<T>(encoder: &mut DescriptorEncoder, sample: &Sample, kind: MetricType, series: &[(Labels, T)]) -> Result<(), std::fmt::Error>
where
    for<'a> Series<'a, T>: EncodeMetric,
{
    let mut metric = encoder.encode_descriptor(sample.name, sample.help, None, kind)?;
    if let [(labels, value)] = series {
        if labels.is_empty() {
            return Series(value).encode(metric);
        }
    }
    for (labels, value) in series {
        let labels: Vec<(Cow<'static, str>, Cow<'_, str>)> = labels.iter().map(|(k, v)| (Cow::Borrowed(*k), Cow::Borrowed(v.as_str()))).collect();
        Series(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for Gathered {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for sample in &self.0 {
            match &sample.value {
                Value::Counter(series) => family(&mut encoder, sample, MetricType::Counter, series)?,
                Value::Gauge(series) => family(&mut encoder, sample, MetricType::Gauge, series)?,
                Value::Histogram(series) => family(&mut encoder, sample, MetricType::Histogram, series)?,
                Value::Counts(series) => {
                    let series: Vec<(Labels, Counted)> = series.iter().map(|(l, h)| (l.clone(), Counted(*h))).collect();
                    family(&mut encoder, sample, MetricType::Histogram, &series)?
                }
            }
        }
        Ok(())
    }
}

/// `samples` in the text exposition format (OpenMetrics, as Prometheus scrapes it).
pub fn encode(samples: Vec<Sample>) -> String {
    let mut registry = Registry::with_prefix("dds");
    registry.register_collector(Box::new(Gathered(samples)));
    let mut text = String::new();
    // Writing into a `String` cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// The longest request a scrape may send, and how long it may take to send it.
const REQUEST_BYTES_MAX: usize = 8 << 10;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `GET /metrics` on `listener` until `stop`, one scrape at a time, each with
/// the samples `gather` returns then; any other path is 404. With a `secret`, a scrape
/// must present its metrics token (`Authorization: Bearer <token>`, the file `cluster
/// up --metrics` writes), else it is answered 401. A client that sends nothing useful
/// within the timeout is dropped.
pub fn serve(listener: TcpListener, stop: &AtomicBool, secret: Option<&Secret>, gather: impl Fn() -> Vec<Sample>) {
    // Non-blocking accepts, so a stop is seen within a tenth of a second.
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = answer(stream, secret, &gather);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Whether the request's headers carry the metrics token of `secret`.
fn authorized(request: &[u8], secret: &Secret) -> bool {
    String::from_utf8_lossy(request).lines().skip(1).filter_map(|l| l.split_once(':')).any(|(name, value)| {
        name.trim().eq_ignore_ascii_case("authorization") && value.trim().strip_prefix("Bearer ").is_some_and(|t| secret.is_metrics_token(t))
    })
}

fn answer(mut stream: TcpStream, secret: Option<&Secret>, gather: &impl Fn() -> Vec<Sample>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    // One deadline for the whole scrape, not per read: a client that trickles bytes
    // cannot hold the server.
    let deadline = std::time::Instant::now() + SCRAPE_TIMEOUT;
    let left = || deadline.checked_duration_since(std::time::Instant::now()).filter(|d| !d.is_zero()).ok_or(std::io::ErrorKind::TimedOut);
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    // Bounded: until the end of the headers, the size limit, or the deadline.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < REQUEST_BYTES_MAX {
        stream.set_read_timeout(Some(left()?))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let path = line.split(|b| *b == b' ').nth(1).unwrap_or_default();
    let (status, content_type, body) = if secret.is_some_and(|s| !authorized(&request, s)) {
        ("401 Unauthorized", "text/plain; charset=utf-8", "this cluster's metrics need its token: Authorization: Bearer <DIR/metrics.token of `cluster up --metrics`, or `dds secret FILE --metrics-token`>\n".to_string())
    } else if line.starts_with(b"GET ") && (path == b"/metrics" || path.starts_with(b"/metrics?")) {
        ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", encode(gather()))
    } else {
        ("404 Not Found", "text/plain; charset=utf-8", "dds serves its metrics at /metrics\n".to_string())
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// Binds the metrics listener (`--metrics ADDR`), with the error a user can act on.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| std::io::Error::new(e.kind(), format!("metrics listener on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_encode_as_prometheus_text() {
        let mut h = Histogram::default();
        h.record(3, 2);
        h.record(1500, 1);
        let text = encode(vec![
            Sample { name: "requests", help: "Requests", value: Value::Counter(vec![(vec![("op", "get".into())], 7)]) },
            Sample { name: "epoch", help: "Map epoch", value: Value::Gauge(vec![(vec![], 4)]) },
            Sample { name: "sync_seconds", help: "Syncs", value: Value::Histogram(vec![(vec![("core", "0".into())], h)]) },
        ]);
        assert!(text.contains("# TYPE dds_requests counter"), "{text}");
        assert!(text.contains("dds_requests_total{op=\"get\"} 7"), "{text}");
        assert!(text.contains("dds_epoch 4"), "{text}");
        assert!(text.contains("dds_sync_seconds_count{core=\"0\"} 3"), "{text}");
        assert!(text.contains("dds_sync_seconds_bucket{le=\"0.000004\",core=\"0\"} 2") || text.contains("dds_sync_seconds_bucket{core=\"0\",le=\"0.000004\"} 2"), "{text}");
        assert!(text.contains("le=\"+Inf\""), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
