//! Generated protobuf messages and tonic clients/servers for every API of the mesh.
//!
//! # Layout
//! - [`types`]: values shared by the mesh's own APIs (`mesh.types.v1`).
//! - [`gateway`]: the public API (`mesh.gateway.v1.Gateway`).
//! - [`features`]: the feature store (`mesh.features.v1.Features`).
//! - [`logger`]: the prediction log (`mesh.logger.v1.PredictionLog`).
//! - [`admin`]: model lifecycle administration on the gateway (`mesh.admin.v1.ModelAdmin`).
//! - [`catalog`]: each inference replica's model versions and their state
//!   (`mesh.catalog.v1.ModelCatalog`).
//! - [`inference`]: the Open Inference Protocol / KServe V2 (`inference.GRPCInferenceService`),
//!   generated from the public `grpc_predict_v2.proto` so any KServe V2 client can call it.
//! - [`FILE_DESCRIPTOR_SET`]: every file above, encoded, for server reflection.

#![allow(missing_docs, clippy::all)]

/// The mesh's own packages, nested as their proto packages are (`mesh.<api>.v1`).
pub mod mesh {
    /// `mesh.types.v1`.
    pub mod types {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("mesh.types.v1");
        }
    }
    /// `mesh.gateway.v1`.
    pub mod gateway {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("mesh.gateway.v1");
        }
    }
    /// `mesh.features.v1`.
    pub mod features {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("mesh.features.v1");
        }
    }
    /// `mesh.logger.v1`.
    pub mod logger {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("mesh.logger.v1");
        }
    }
    /// `mesh.admin.v1`.
    pub mod admin {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("mesh.admin.v1");
        }
    }
    /// `mesh.catalog.v1`.
    pub mod catalog {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("mesh.catalog.v1");
        }
    }
}

pub use mesh::admin::v1 as admin;
pub use mesh::catalog::v1 as catalog;
pub use mesh::features::v1 as features;
pub use mesh::gateway::v1 as gateway;
pub use mesh::logger::v1 as logger;
pub use mesh::types::v1 as types;

/// `inference` (KServe V2).
pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded `FileDescriptorSet` of every proto of the mesh, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mesh_descriptor");

/// Fully qualified names of the services each binary exposes, as reflection and health use them.
pub mod service_names {
    /// `mesh.gateway.v1.Gateway`.
    pub const GATEWAY: &str = "mesh.gateway.v1.Gateway";
    /// `mesh.features.v1.Features`.
    pub const FEATURES: &str = "mesh.features.v1.Features";
    /// `mesh.logger.v1.PredictionLog`.
    pub const LOGGER: &str = "mesh.logger.v1.PredictionLog";
    /// `inference.GRPCInferenceService`.
    pub const INFERENCE: &str = "inference.GRPCInferenceService";
    pub const CATALOG: &str = "mesh.catalog.v1.ModelCatalog";
    pub const ADMIN: &str = "mesh.admin.v1.ModelAdmin";
}

/// Calling the gateway's admin API (`mesh.admin.v1.ModelAdmin`): the admin key travels in the
/// [`ADMIN_KEY_HEADER`](admin_key::ADMIN_KEY_HEADER) metadata entry, never with the API keys.
pub mod admin_key {
    use std::time::Duration;

    use tonic::metadata::{errors::InvalidMetadataValue, Ascii, MetadataValue};

    /// The metadata entry carrying an admin key (one of the gateway's `MESH_ADMIN_KEYS`).
    pub const ADMIN_KEY_HEADER: &str = "x-admin-key";

    /// Adds the admin key and a deadline to every call of a client.
    #[derive(Clone)]
    pub struct AdminKey {
        key: MetadataValue<Ascii>,
        timeout: Duration,
    }

    impl AdminKey {
        /// `key` on every call, each with `timeout` as its deadline; an error if `key` cannot
        /// be sent as gRPC metadata (not visible ASCII).
        pub fn new(key: &str, timeout: Duration) -> Result<Self, InvalidMetadataValue> {
            Ok(Self {
                key: key.parse()?,
                timeout,
            })
        }
    }

    impl tonic::service::Interceptor for AdminKey {
        fn call(
            &mut self,
            mut request: tonic::Request<()>,
        ) -> Result<tonic::Request<()>, tonic::Status> {
            request
                .metadata_mut()
                .insert(ADMIN_KEY_HEADER, self.key.clone());
            request.set_timeout(self.timeout);
            Ok(request)
        }
    }

    /// A client of the admin API sending an admin key.
    pub type AdminClient<T> = crate::admin::model_admin_client::ModelAdminClient<
        tonic::service::interceptor::InterceptedService<T, AdminKey>,
    >;
}
