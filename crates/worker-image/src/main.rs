#[tokio::main]
async fn main() -> std::process::ExitCode {
    worker_runtime::main(volley_domain::InferenceType::Image).await
}
