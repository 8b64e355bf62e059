//! `mesh-bench floor`: the transport floor the mesh is measured against.
//!
//! A bare tonic server of KServe's `GRPCInferenceService` on default settings: `ModelInfer`
//! decodes every input tensor (checking each declares and carries the same number of rows, as
//! a real server must) and answers a fixed `probabilities` tensor of that many rows. No model,
//! no middleware, no token check, no metrics, no tracing: what remains of a request's cost is
//! gRPC, HTTP/2 and protobuf. `make bench` runs the same loads against it and against the mesh
//! back to back and reports each mesh figure as a share of the floor's.

use std::net::SocketAddr;

use mesh_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use mesh_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use mesh_tensor::{decode_input, encode_output, ColumnKind, OutputData};
use tonic::{Request, Response, Status};

/// The floor's answer per row: two class probabilities, like the churn model's.
const ROW: [f32; 2] = [0.7, 0.3];

/// The floor server.
#[derive(Default)]
pub struct Floor;

#[tonic::async_trait]
impl GrpcInferenceService for Floor {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        _: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        Ok(Response::new(ModelReadyResponse { ready: true }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Err(Status::unimplemented("the floor serves ModelInfer only"))
    }

    async fn model_metadata(
        &self,
        _: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        Err(Status::unimplemented("the floor serves ModelInfer only"))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let request = request.into_inner();
        let raw = !request.raw_input_contents.is_empty();
        let mut rows = None;
        for (i, input) in request.inputs.iter().enumerate() {
            let kind = match input.datatype.as_str() {
                "BYTES" => ColumnKind::Category,
                _ => ColumnKind::Number,
            };
            let bytes = request.raw_input_contents.get(i).map(Vec::as_slice);
            let column = decode_input(input, bytes, kind)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            match rows {
                None => rows = Some(column.len()),
                Some(n) if n != column.len() => {
                    return Err(Status::invalid_argument(format!(
                        "input {} has {} rows, the first had {n}",
                        input.name,
                        column.len()
                    )))
                }
                Some(_) => {}
            }
        }
        let rows = rows.ok_or_else(|| Status::invalid_argument("no inputs"))?;
        let data: Vec<f32> = ROW.iter().copied().cycle().take(rows * ROW.len()).collect();
        let (output, bytes) = encode_output(
            "probabilities".into(),
            vec![rows as i64, ROW.len() as i64],
            OutputData::F32(data),
            raw,
        );
        Ok(Response::new(ModelInferResponse {
            model_name: request.model_name,
            model_version: request.model_version,
            id: request.id,
            parameters: Default::default(),
            outputs: vec![output],
            raw_output_contents: bytes.into_iter().collect(),
        }))
    }
}

/// Serves the floor on `listen` until SIGTERM or SIGINT; prints the bound address first.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    println!("mesh-bench floor: KServe ModelInfer on {addr}");
    // Small messages: without TCP_NODELAY each answer waits for the peer's delayed ACK (as the
    // mesh's own listener, the floor sets it on every connection).
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(GrpcInferenceServiceServer::new(Floor).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
