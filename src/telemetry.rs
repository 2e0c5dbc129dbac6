//! Logs and traces of the long-running commands: structured logs on stderr
//! (text, or JSON lines with `--log-json`), filtered by `STRAIT_LOG`; and,
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP/gRPC
//! through `tracing-opentelemetry` (the standard `OTEL_*` variables apply:
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_SCHEDULE_DELAY`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, ...).

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable that turns OTLP export on.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Errors setting up the OTLP exporter.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The exporter cannot be built (a malformed endpoint, say).
    #[error("OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Flushes exported spans at exit.
pub struct Guard(Option<SdkTracerProvider>);

impl Guard {
    /// Exports what is still buffered, waiting at most a few seconds.
    pub async fn shutdown(self) {
        let Some(provider) = self.0 else { return };
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(Duration::from_secs(5), flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("warning: flushing traces: {e}"),
            Ok(Err(e)) => eprintln!("warning: flushing traces: {e}"),
            Err(_) => eprintln!("warning: flushing traces timed out"),
        }
    }
}

fn provider(service: &str) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let Some(endpoint) = std::env::var(OTLP_ENDPOINT_ENV)
        .ok()
        .filter(|e| !e.trim().is_empty())
    else {
        return Ok(None);
    };
    // The builder reads the endpoint (and timeout, headers) from OTEL_*.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: endpoint.clone(),
            source,
        })?;
    // The tokio-driven batch processor: tonic needs the runtime's reactor,
    // which the default thread-based processor does not have.
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.build())
            .build(),
    ))
}

/// Installs the global subscriber for `service` (`strait-control`,
/// `strait-node`, ...). Must run inside the Tokio runtime.
pub fn init(service: &str, json: bool) -> Result<Guard, TelemetryError> {
    let filter = EnvFilter::try_from_env("STRAIT_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,h2=warn,tower=warn"));
    let provider = provider(service)?;
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("strait"))
            .with_tracked_inactivity(false)
    });
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    if let Some(endpoint) = provider
        .as_ref()
        .and_then(|_| std::env::var(OTLP_ENDPOINT_ENV).ok())
    {
        tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
    }
    Ok(Guard(provider))
}
