//! A resource's ETags: the version of a document, and which rendering of the table's rows
//! it is in. Knows nothing of HTTP headers (`http::response` quotes them).

use super::definition::Resource;

impl Resource {
    /// The same resource, its documents rendered in the shape announced at `epoch`.
    pub fn with_shape_epoch(mut self, epoch: i64) -> Self {
        self.shape_epoch = epoch;
        self
    }

    /// The ETag of this resource's document at `version`, as a header value without its
    /// quotes: the version alone while the table has the shape syncar was installed on,
    /// `{version}-{epoch}` once it changed shape, so that one ETag never names two renderings
    /// of one row version (a column added changes every document, not any version).
    pub fn etag(&self, version: i64) -> String {
        match self.shape_epoch {
            0 => version.to_string(),
            epoch => format!("{version}-{epoch}"),
        }
    }

    /// Which rendering of the table's rows this resource serves (0: the original).
    pub fn shape_epoch(&self) -> i64 {
        self.shape_epoch
    }
}
