//! The device the front end sees: the virtio feature bits offered and the
//! virtio-blk configuration space (virtio 1.2 §5.2.4), encoded little-endian
//! at the offsets of `virtio_bindings`' `virtio_blk_config`.

use std::mem::offset_of;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, virtio_blk_config,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Bytes per virtio-blk sector (fixed by the specification).
pub const SECTOR: u64 = 512;

/// Offset of the `wce` (writeback cache enable) byte in the configuration space.
pub const WCE_OFFSET: usize = offset_of!(virtio_blk_config, wce);

/// Length of the configuration space we describe (up to and including the
/// write-zeroes fields; the secure-erase and zoned fields stay zero).
pub const CONFIG_LEN: usize = offset_of!(virtio_blk_config, unused1) + 3;

/// Largest data part of one request. Linux sends at most a few MiB; bigger
/// requests get `VIRTIO_BLK_S_IOERR` so that a hostile front end cannot make
/// the backend allocate unbounded buffers.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// Sectors per discard or write-zeroes segment (32 MiB).
pub const MAX_ZERO_SECTORS: u32 = (32 << 20) / SECTOR as u32;

/// Segments per discard or write-zeroes request.
pub const MAX_ZERO_SEGMENTS: u32 = 16;

/// Bytes of the `VIRTIO_BLK_T_GET_ID` answer.
pub const ID_BYTES: usize = 20;

/// What the device looks like; fixed for the life of a connection except the
/// write cache mode, which the driver may change.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Disk size in bytes (the last partial sector, if any, is not exposed).
    pub size: u64,
    /// Request queues.
    pub num_queues: u16,
    /// Largest queue size a driver may choose.
    pub queue_size: u16,
    /// Export read-only (`VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// The image's block size: advertised as the physical block size (up
    /// to 4 KiB) and the optimal I/O size.
    pub block_size: u64,
    /// The `VIRTIO_BLK_T_GET_ID` serial (at most 20 bytes are sent).
    pub serial: String,
}

impl DeviceConfig {
    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR
    }

    /// Data segments per request the driver may use.
    pub fn seg_max(&self) -> u32 {
        // Room for the header and status descriptors, as QEMU does.
        u32::from(self.queue_size.saturating_sub(2)).max(1)
    }

    /// The virtio feature bits offered.
    pub fn features(&self) -> u64 {
        let mut bits = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        bits
    }

    /// The vhost-user protocol features offered: the configuration space,
    /// several queues, and acknowledged requests.
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    /// The configuration space, with the write cache on (`wce`) or off.
    pub fn space(&self, wce: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| {
            if let Some(dst) = c.get_mut(off..off + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        let phys = self.block_size.clamp(SECTOR, 4096);
        let phys_exp = (phys / SECTOR).trailing_zeros() as u8;
        let opt_io = u32::try_from(self.block_size / SECTOR).unwrap_or(0);
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.sectors().to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &self.seg_max().to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &(SECTOR as u32).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, physical_block_exp),
            &[phys_exp],
        );
        put(
            offset_of!(virtio_blk_config, min_io_size),
            &1u16.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, opt_io_size),
            &opt_io.to_le_bytes(),
        );
        put(WCE_OFFSET, &[u8::from(wce)]);
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.num_queues.to_le_bytes(),
        );
        if !self.read_only {
            put(
                offset_of!(virtio_blk_config, max_discard_sectors),
                &MAX_ZERO_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_discard_seg),
                &MAX_ZERO_SEGMENTS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, discard_sector_alignment),
                &u32::try_from((self.block_size / SECTOR).max(1))
                    .unwrap_or(1)
                    .to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                &MAX_ZERO_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                &MAX_ZERO_SEGMENTS.to_le_bytes(),
            );
            put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        }
        c
    }

    /// `size` bytes of the configuration space from `offset` (zeros past
    /// its end), as `VHOST_USER_GET_CONFIG` answers.
    pub fn read(&self, wce: bool, offset: u32, size: u32) -> Vec<u8> {
        let space = self.space(wce);
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        if let (Some(src), Some(dst)) = (space.get(start..end), out.get_mut(..end - start)) {
            dst.copy_from_slice(src);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(read_only: bool) -> DeviceConfig {
        DeviceConfig {
            size: (1 << 30) + 100,
            num_queues: 4,
            queue_size: 256,
            read_only,
            block_size: 65536,
            serial: "disk".into(),
        }
    }

    fn u32_at(c: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(c[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn config_space_fields() {
        let d = dev(false);
        let c = d.space(true);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512,
            "capacity in whole sectors"
        );
        assert_eq!(u32_at(&c, offset_of!(virtio_blk_config, seg_max)), 254);
        assert_eq!(u32_at(&c, offset_of!(virtio_blk_config, blk_size)), 512);
        assert_eq!(c[offset_of!(virtio_blk_config, physical_block_exp)], 3);
        assert_eq!(u32_at(&c, offset_of!(virtio_blk_config, opt_io_size)), 128);
        assert_eq!(c[WCE_OFFSET], 1);
        assert_eq!(d.space(false)[WCE_OFFSET], 0);
        let nq = offset_of!(virtio_blk_config, num_queues);
        assert_eq!(u16::from_le_bytes([c[nq], c[nq + 1]]), 4);
        assert_eq!(
            u32_at(&c, offset_of!(virtio_blk_config, max_discard_seg)),
            MAX_ZERO_SEGMENTS
        );
        assert_eq!(c[offset_of!(virtio_blk_config, write_zeroes_may_unmap)], 1);
        // Read-only: no discard or write-zeroes limits, the RO bit set.
        let r = dev(true);
        assert_eq!(
            u32_at(
                &r.space(true),
                offset_of!(virtio_blk_config, max_discard_sectors)
            ),
            0
        );
        assert_ne!(r.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(r.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(d.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn reads_are_clipped_and_padded() {
        let d = dev(false);
        let whole = d.space(true);
        assert_eq!(d.read(true, 0, CONFIG_LEN as u32), whole.to_vec());
        let tail = d.read(true, CONFIG_LEN as u32 - 4, 64);
        assert_eq!(tail.len(), 64);
        assert_eq!(&tail[..4], &whole[CONFIG_LEN - 4..]);
        assert!(tail[4..].iter().all(|&b| b == 0));
        assert_eq!(d.read(true, u32::MAX, 8), vec![0; 8]);
    }
}
