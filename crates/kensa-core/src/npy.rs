//! Minimal NumPy `.npy` (format 1.0) writer and reader for float32 2-D arrays.

use std::io::{self, Read, Write};

/// Writes a little-endian float32 array of shape (rows, cols).
pub fn write_f32_2d<W: Write>(mut w: W, rows: usize, cols: usize, data: &[f32]) -> io::Result<()> {
    assert_eq!(rows * cols, data.len());
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // magic(6) + version(2) + len(2) + header + '\n' must be a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    w.write_all(&bytes)
}

/// Reads what [`write_f32_2d`] writes: returns (rows, cols, data).
pub fn read_f32_2d<R: Read>(mut r: R) -> io::Result<(usize, usize, Vec<f32>)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut pre = [0u8; 10];
    r.read_exact(&mut pre)?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(bad("not an .npy file"));
    }
    let hlen = u16::from_le_bytes([pre[8], pre[9]]) as usize;
    let mut header = vec![0u8; hlen];
    r.read_exact(&mut header)?;
    let header = String::from_utf8_lossy(&header);
    if !header.contains("'<f4'") {
        return Err(bad("only little-endian float32 is supported"));
    }
    let shape = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let [rows, cols] = dims[..] else { return Err(bad("not 2-D")) };
    let mut bytes = vec![0u8; rows * cols * 4];
    r.read_exact(&mut bytes)?;
    let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((rows, cols, data))
}

#[cfg(test)]
mod tests {
    #[test]
    fn roundtrip() {
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        let mut buf = Vec::new();
        super::write_f32_2d(&mut buf, 3, 4, &data).unwrap();
        assert_eq!((buf.len() - 48) % 16, 0);
        assert_eq!(&buf[..6], b"\x93NUMPY");
        let hlen = u16::from_le_bytes([buf[8], buf[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let (r, c, d) = super::read_f32_2d(&buf[..]).unwrap();
        assert_eq!((r, c), (3, 4));
        assert_eq!(d, data);
    }
}
