//! AWS clients and the one place that turns SDK errors into outcomes and metrics.
//!
//! Region, credentials and endpoints come from the standard AWS SDK settings
//! (`AWS_REGION`, `AWS_ENDPOINT_URL[_KINESIS|_DYNAMODB]`, the default credential chain):
//! nothing here knows about emulators.

use std::future::Future;
use std::time::Duration;

use aws_config::timeout::TimeoutConfig;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

use crate::metrics::{CallOutcome, Metrics};

/// Upper bound of one AWS call including the SDK's retries. Loops are judged stuck only after
/// the failover timeout plus this.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// The two clients a worker needs, plus the metrics every call is counted in.
#[derive(Clone)]
pub struct AwsClients {
    pub kinesis: aws_sdk_kinesis::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub metrics: Metrics,
}

impl AwsClients {
    /// Loads the shared AWS configuration the way every AWS tool does.
    pub async fn from_env(metrics: Metrics) -> Self {
        // Bounded calls: a hung connection must not stall a heartbeat past the failover timeout.
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(2))
            .operation_attempt_timeout(Duration::from_secs(4))
            .operation_timeout(OPERATION_TIMEOUT)
            .build();
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(timeouts)
            .load()
            .await;
        AwsClients {
            kinesis: aws_sdk_kinesis::Client::new(&shared),
            dynamodb: aws_sdk_dynamodb::Client::new(&shared),
            metrics,
        }
    }
}

/// What went wrong with one AWS call, reduced to what the worker acts on.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// A conditional write lost: somebody else changed the item first.
    #[error("{operation}: condition failed")]
    ConditionFailed { operation: &'static str },
    /// The table or stream does not exist.
    #[error("{operation}: not found: {message}")]
    NotFound {
        operation: &'static str,
        message: String,
    },
    /// The resource exists already (CreateTable / CreateStream races).
    #[error("{operation}: already exists")]
    AlreadyExists { operation: &'static str },
    /// The request was refused as invalid (`InvalidArgumentException`: a sequence number
    /// that does not belong to this stream, ...). Retrying does not help.
    #[error("{operation}: invalid: {message}")]
    Invalid {
        operation: &'static str,
        message: String,
    },
    /// Anything else: network, throttling after retries, service errors.
    #[error("{operation}: {message}")]
    Unavailable {
        operation: &'static str,
        message: String,
    },
}

/// Error codes a retry cannot fix (credentials, permissions, malformed requests).
const PERMANENT_CODES: &[&str] = &[
    "AccessDenied",
    "UnrecognizedClient",
    "InvalidClientTokenId",
    "InvalidSignature",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "NotAuthorized",
    "KMSAccessDenied",
    "ValidationException",
    "InvalidArgumentException",
    "SerializationException",
];

impl AwsError {
    pub fn is_condition_failed(&self) -> bool {
        matches!(self, AwsError::ConditionFailed { .. })
    }

    /// Worth another try later: throttling (after the SDK's own retries), network and service
    /// errors. Not a missing or existing resource, a lost condition, or a request the service
    /// refuses for good (credentials, permissions, validation).
    pub fn is_transient(&self) -> bool {
        match self {
            AwsError::Unavailable { message, .. } => {
                !PERMANENT_CODES.iter().any(|code| message.starts_with(code))
            }
            _ => false,
        }
    }
}

/// The outcome label of a failed call. A cancelled transaction is a lost condition only when
/// one of its reasons (listed in the message, as DynamoDB writes it:
/// `... [None, ConditionalCheckFailed]`) says so; a conflict with another transaction or a
/// throttled item is worth another try.
fn classify(code: Option<&str>, message: Option<&str>) -> CallOutcome {
    match code {
        Some("ConditionalCheckFailedException") => CallOutcome::ConditionalCheckFailed,
        Some("TransactionCanceledException") => {
            if message.is_some_and(|m| m.contains("ConditionalCheckFailed")) {
                CallOutcome::ConditionalCheckFailed
            } else {
                CallOutcome::TransactionConflict
            }
        }
        Some("ResourceNotFoundException") => CallOutcome::NotFound,
        Some("ResourceInUseException") => CallOutcome::AlreadyExists,
        Some("InvalidArgumentException") => CallOutcome::InvalidArgument,
        Some(c)
            if c.contains("Throttl")
                || c.contains("LimitExceeded")
                || c.contains("ThroughputExceeded") =>
        {
            CallOutcome::Throttled
        }
        _ => CallOutcome::Error,
    }
}

/// Runs one AWS call, counts it by outcome, and maps its error.
pub async fn call<T, E, R, F>(
    metrics: &Metrics,
    service: &'static str,
    operation: &'static str,
    request: F,
) -> Result<T, AwsError>
where
    F: Future<Output = Result<T, SdkError<E, R>>>,
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match request.await {
        Ok(v) => {
            metrics.record_call(service, operation, CallOutcome::Ok);
            Ok(v)
        }
        Err(err) => {
            let code = err.code().map(str::to_owned);
            let outcome = classify(code.as_deref(), err.message());
            metrics.record_call(service, operation, outcome);
            let message = match err.message() {
                Some(m) => format!("{}: {m}", code.as_deref().unwrap_or("error")),
                None => aws_sdk_dynamodb::error::DisplayErrorContext(&err).to_string(),
            };
            Err(match outcome {
                CallOutcome::ConditionalCheckFailed => AwsError::ConditionFailed { operation },
                CallOutcome::NotFound => AwsError::NotFound { operation, message },
                CallOutcome::AlreadyExists => AwsError::AlreadyExists { operation },
                CallOutcome::InvalidArgument => AwsError::Invalid { operation, message },
                CallOutcome::Ok
                | CallOutcome::TransactionConflict
                | CallOutcome::Throttled
                | CallOutcome::Error => AwsError::Unavailable { operation, message },
            })
        }
    }
}

/// Which items a scan returns.
#[derive(Debug, Clone, Copy)]
pub enum ScanFilter<'a> {
    All,
    /// Items whose `attribute` (a string) begins with `prefix`.
    BeginsWith {
        attribute: &'a str,
        prefix: &'a str,
    },
}

/// How fresh a scan's reads are (a strongly consistent read costs twice as much).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Strong,
    Eventual,
}

/// Every item of a scan, all pages. The tables this is used on hold O(workers) or O(shards)
/// items.
pub async fn scan_all(
    aws: &AwsClients,
    table: &str,
    filter: ScanFilter<'_>,
    consistency: Consistency,
) -> Result<Vec<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>, AwsError>
{
    let mut items = Vec::new();
    let mut start = None;
    loop {
        let mut req = aws
            .dynamodb
            .scan()
            .table_name(table)
            .consistent_read(consistency == Consistency::Strong)
            .set_exclusive_start_key(start.take());
        if let ScanFilter::BeginsWith { attribute, prefix } = filter {
            req = req
                .filter_expression("begins_with(#a, :p)")
                .expression_attribute_names("#a", attribute)
                .expression_attribute_values(
                    ":p",
                    aws_sdk_dynamodb::types::AttributeValue::S(prefix.to_owned()),
                );
        }
        let out = call(&aws.metrics, "dynamodb", "Scan", req.send()).await?;
        items.extend(out.items.unwrap_or_default());
        match out.last_evaluated_key {
            Some(k) if !k.is_empty() => start = Some(k),
            _ => return Ok(items),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::classify;
    use crate::metrics::CallOutcome;

    #[test]
    fn error_codes_map_to_outcomes() {
        let code = |c| classify(Some(c), None);
        assert_eq!(
            code("ConditionalCheckFailedException"),
            CallOutcome::ConditionalCheckFailed
        );
        let cancelled = |m| classify(Some("TransactionCanceledException"), Some(m));
        assert_eq!(
            cancelled(
                "Transaction cancelled, please refer cancellation reasons for specific reasons [ConditionalCheckFailed, None]"
            ),
            CallOutcome::ConditionalCheckFailed
        );
        assert_eq!(
            cancelled(
                "Transaction cancelled, please refer cancellation reasons for specific reasons [None, TransactionConflict]"
            ),
            CallOutcome::TransactionConflict
        );
        assert_eq!(code("ResourceNotFoundException"), CallOutcome::NotFound);
        assert_eq!(code("ResourceInUseException"), CallOutcome::AlreadyExists);
        assert_eq!(code("ThrottlingException"), CallOutcome::Throttled);
        assert_eq!(
            code("ProvisionedThroughputExceededException"),
            CallOutcome::Throttled
        );
        assert_eq!(code("LimitExceededException"), CallOutcome::Throttled);
        assert_eq!(classify(None, None), CallOutcome::Error);
    }

    #[test]
    fn throttling_and_network_errors_are_transient() {
        use super::AwsError;
        let unavailable = |message: &str| AwsError::Unavailable {
            operation: "DescribeStreamSummary",
            message: message.to_owned(),
        };
        assert!(unavailable("LimitExceededException: Rate exceeded for stream s").is_transient());
        assert!(unavailable("ThrottlingException: slow down").is_transient());
        assert!(unavailable("dispatch failure: io error: connection refused").is_transient());
        assert!(unavailable("InternalFailure: oops").is_transient());
        assert!(!unavailable("AccessDeniedException: not allowed").is_transient());
        assert!(!unavailable("UnrecognizedClientException: bad key").is_transient());
        assert!(!unavailable("ValidationException: bad request").is_transient());
        let not_found = AwsError::NotFound {
            operation: "DescribeStreamSummary",
            message: "no such stream".into(),
        };
        assert!(!not_found.is_transient());
        assert!(
            !AwsError::ConditionFailed {
                operation: "UpdateItem"
            }
            .is_transient()
        );
    }
}
