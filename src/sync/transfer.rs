//! Moving chunks: reading the copies this node holds.

use super::Node;

impl Node {
    /// Reads a chunk from wherever this node holds it (a live file or a pack), checked
    /// against its id; `None` if no copy is intact.
    pub fn read_local_chunk(&self, id: &crate::ids::ChunkId) -> Option<Vec<u8>> {
        let locations = self.store.chunk_locations(id).ok()?;
        for location in locations {
            let data = match location {
                crate::store::ChunkLocation::Live {
                    vol,
                    dir,
                    name,
                    extent,
                } => {
                    let volume = self.volumes.iter().find(|v| v.id == vol)?;
                    let path = dir.join(&name).ok()?;
                    volume.fs.read_chunk(&path, extent, id)
                }
                crate::store::ChunkLocation::Pack { pack, extent } => {
                    let path = self
                        .store
                        .packs_dir()
                        .join(crate::store::pack::pack_file_name(pack));
                    crate::store::pack::read_chunk(&path, extent, id).ok()
                }
            };
            if data.is_some() {
                return data;
            }
        }
        None
    }
}
