//! TLS for `NBD_OPT_STARTTLS`, client side: the connector built from PEM
//! files.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::pem::{bad, load_certs, load_key, load_roots, provider};
use crate::stream::{Plain, Stream};

/// How the client upgrades its connections to TLS.
#[derive(Clone)]
pub struct TlsConfig {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Trust the CA certificates of the PEM file `ca`, present the client
    /// certificate chain and key `client` when given, and expect the server
    /// to prove it is `server_name` (a host name or an IP address).
    pub fn from_files(
        ca: &Path,
        client: Option<(&Path, &Path)>,
        server_name: &str,
    ) -> io::Result<TlsConfig> {
        let roots = load_roots(ca)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| io::Error::other(format!("TLS setup: {e}")))?
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| bad(cert, "certificate and key do not fit", e))?,
            None => builder.with_no_client_auth(),
        };
        let server_name = ServerName::try_from(server_name.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{server_name}' is not a valid TLS server name: {e}"),
            )
        })?;
        Ok(TlsConfig {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Run the TLS handshake over `plain`.
    pub(crate) async fn connect(&self, plain: Plain) -> io::Result<Stream> {
        let tls = self
            .connector
            .connect(self.server_name.clone(), plain)
            .await?;
        Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
    }
}
