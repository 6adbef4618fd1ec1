//! CloudWatch metrics: PutMetricData, GetMetricStatistics and GetMetricData (query
//! protocol).

use std::time::{Duration, SystemTime};

use aws_smithy_types::date_time::Format;
use aws_smithy_types::DateTime;

use crate::client::AwsConfig;
use crate::clients::malformed;
use crate::endpoints::Service;
use crate::error::{Error, Result};

/// One metric value to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricDatum {
    /// The metric name.
    pub name: String,
    /// The value.
    pub value: f64,
    /// The unit (`Count`, `Bytes`, `Seconds`, `None`, …).
    pub unit: String,
    /// Dimension name/value pairs.
    pub dimensions: Vec<(String, String)>,
    /// When it was measured; `None` means now (as CloudWatch receives it).
    pub timestamp: Option<SystemTime>,
}

/// One aggregated data point.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Datapoint {
    /// The start of the period.
    pub timestamp: Option<SystemTime>,
    /// `Sum`, if asked for.
    pub sum: Option<f64>,
    /// `Average`, if asked for.
    pub average: Option<f64>,
    /// `Maximum`, if asked for.
    pub maximum: Option<f64>,
    /// `Minimum`, if asked for.
    pub minimum: Option<f64>,
    /// `SampleCount`, if asked for.
    pub sample_count: Option<f64>,
}

/// The values of one metric over time, as GetMetricData returns them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricSeries {
    /// `(period start, value)` pairs, sorted by time.
    pub points: Vec<(SystemTime, f64)>,
    /// `Complete`, or `PartialData` when CloudWatch had more than it returned.
    pub status: String,
}

fn iso8601(t: SystemTime) -> Result<String> {
    DateTime::from(t)
        .fmt(Format::DateTime)
        .map_err(|e| Error::Config(format!("unrepresentable time: {e}")))
}

/// The CloudWatch client.
#[derive(Clone, Debug)]
pub struct CloudWatchClient {
    config: AwsConfig,
}

impl CloudWatchClient {
    /// A client using `config`.
    pub fn new(config: &AwsConfig) -> Self {
        CloudWatchClient {
            config: config.clone(),
        }
    }

    /// PutMetricData (up to 1000 data).
    pub fn put_metric_data(&self, namespace: &str, data: &[MetricDatum]) -> Result<()> {
        if data.len() > 1000 {
            return Err(Error::Config(
                "PutMetricData takes at most 1000 data".into(),
            ));
        }
        let mut params: Vec<(String, String)> = vec![("Namespace".into(), namespace.into())];
        for (i, d) in data.iter().enumerate() {
            let p = format!("MetricData.member.{}", i + 1);
            params.push((format!("{p}.MetricName"), d.name.clone()));
            params.push((format!("{p}.Value"), d.value.to_string()));
            params.push((format!("{p}.Unit"), d.unit.clone()));
            if let Some(t) = d.timestamp {
                params.push((format!("{p}.Timestamp"), iso8601(t)?));
            }
            for (j, (k, v)) in d.dimensions.iter().enumerate() {
                params.push((format!("{p}.Dimensions.member.{}.Name", j + 1), k.clone()));
                params.push((format!("{p}.Dimensions.member.{}.Value", j + 1), v.clone()));
            }
        }
        let params: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.config
            .call_query(Service::CloudWatch, "PutMetricData", &params)?;
        Ok(())
    }

    /// GetMetricStatistics over `[start, end)` in periods of `period`, for `statistics`
    /// (`Sum`, `Average`, `Maximum`, `Minimum`, `SampleCount`). Data points are sorted by
    /// time. An idle metric has no data points at all: callers must treat that as zero.
    #[allow(clippy::too_many_arguments)]
    pub fn get_metric_statistics(
        &self,
        namespace: &str,
        metric: &str,
        dimensions: &[(&str, &str)],
        start: SystemTime,
        end: SystemTime,
        period: Duration,
        statistics: &[&str],
    ) -> Result<Vec<Datapoint>> {
        let mut params: Vec<(String, String)> = vec![
            ("Namespace".into(), namespace.into()),
            ("MetricName".into(), metric.into()),
            ("StartTime".into(), iso8601(start)?),
            ("EndTime".into(), iso8601(end)?),
            ("Period".into(), period.as_secs().max(1).to_string()),
        ];
        for (i, s) in statistics.iter().enumerate() {
            params.push((format!("Statistics.member.{}", i + 1), s.to_string()));
        }
        for (i, (k, v)) in dimensions.iter().enumerate() {
            params.push((format!("Dimensions.member.{}.Name", i + 1), k.to_string()));
            params.push((format!("Dimensions.member.{}.Value", i + 1), v.to_string()));
        }
        let params: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let root = self
            .config
            .call_query(Service::CloudWatch, "GetMetricStatistics", &params)?;
        datapoints(&root)
    }

    /// GetMetricData for one metric and one statistic (`Sum`, `Average`, `Maximum`,
    /// `Minimum`, `SampleCount`, `p99`, …) over `[start, end)` in periods of `period`.
    /// Periods without data are absent: callers must treat that as zero.
    #[allow(clippy::too_many_arguments)]
    pub fn get_metric_data(
        &self,
        namespace: &str,
        metric: &str,
        dimensions: &[(&str, &str)],
        start: SystemTime,
        end: SystemTime,
        period: Duration,
        statistic: &str,
    ) -> Result<MetricSeries> {
        const Q: &str = "MetricDataQueries.member.1";
        let mut params: Vec<(String, String)> = vec![
            (format!("{Q}.Id"), "m1".into()),
            (format!("{Q}.MetricStat.Metric.Namespace"), namespace.into()),
            (format!("{Q}.MetricStat.Metric.MetricName"), metric.into()),
            (
                format!("{Q}.MetricStat.Period"),
                period.as_secs().max(1).to_string(),
            ),
            (format!("{Q}.MetricStat.Stat"), statistic.into()),
            (format!("{Q}.ReturnData"), "true".into()),
            ("StartTime".into(), iso8601(start)?),
            ("EndTime".into(), iso8601(end)?),
        ];
        for (i, (k, v)) in dimensions.iter().enumerate() {
            let d = format!("{Q}.MetricStat.Metric.Dimensions.member.{}", i + 1);
            params.push((format!("{d}.Name"), k.to_string()));
            params.push((format!("{d}.Value"), v.to_string()));
        }
        let params: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let root = self
            .config
            .call_query(Service::CloudWatch, "GetMetricData", &params)?;
        let result = root
            .child("GetMetricDataResult")
            .ok_or_else(|| malformed("monitoring", "GetMetricData", "no result"))?;
        let Some(series) = result
            .items("MetricDataResults")
            .find(|r| r.text_at(&["Id"]) == Some("m1"))
        else {
            return Ok(MetricSeries {
                points: Vec::new(),
                status: "Complete".into(),
            });
        };
        let times = series.items("Timestamps").map(|t| {
            crate::chain::parse_rfc3339(&t.text)
                .ok_or_else(|| malformed("monitoring", "GetMetricData", "unparsable Timestamp"))
        });
        let values = series.items("Values").map(|v| {
            v.text
                .trim()
                .parse::<f64>()
                .map_err(|_| malformed("monitoring", "GetMetricData", "unparsable value"))
        });
        let mut points = Vec::new();
        for (t, v) in times.zip(values) {
            points.push((t?, v?));
        }
        if series.items("Timestamps").count() != series.items("Values").count() {
            return Err(malformed(
                "monitoring",
                "GetMetricData",
                "Timestamps and Values differ in length",
            ));
        }
        points.sort_by_key(|p| p.0);
        Ok(MetricSeries {
            points,
            status: series
                .text_at(&["StatusCode"])
                .unwrap_or("Complete")
                .to_string(),
        })
    }
}

/// The datapoints of a GetMetricStatistics answer, oldest first.
pub(crate) fn datapoints(root: &crate::xml::XmlNode) -> Result<Vec<Datapoint>> {
    let result = root
        .child("GetMetricStatisticsResult")
        .ok_or_else(|| malformed("monitoring", "GetMetricStatistics", "no result"))?;
    let num = |n: &crate::xml::XmlNode, name: &str| n.text_at(&[name]).and_then(|v| v.parse().ok());
    let mut points: Vec<Datapoint> = result
        .items("Datapoints")
        .map(|n| Datapoint {
            timestamp: n
                .text_at(&["Timestamp"])
                .and_then(crate::chain::parse_rfc3339),
            sum: num(n, "Sum"),
            average: num(n, "Average"),
            maximum: num(n, "Maximum"),
            minimum: num(n, "Minimum"),
            sample_count: num(n, "SampleCount"),
        })
        .collect();
    points.sort_by_key(|p| p.timestamp);
    Ok(points)
}
