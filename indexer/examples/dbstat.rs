fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let idx = indexer::search::Index::open(&dir).unwrap();
    let s = idx.store();
    let rtxn = s.env.read_txn().unwrap();
    let n = idx.meta.descriptors as f64;
    for (name, st) in [
        ("meta", s.meta.stat(&rtxn).unwrap()),
        ("images", s.images.stat(&rtxn).unwrap()),
        ("kps", s.kps.stat(&rtxn).unwrap()),
        ("lists", s.lists.stat(&rtxn).unwrap()),
        ("arroy", s.arroy.stat(&rtxn).unwrap()),
    ] {
        let pages = st.branch_pages + st.leaf_pages + st.overflow_pages;
        println!(
            "{name:8} entries {:>9} pages {:>8} ({} overflow) bytes/desc {:.1}",
            st.entries,
            pages,
            st.overflow_pages,
            pages as f64 * 4096.0 / n
        );
    }
    println!("file bytes/desc {:.1}", idx.disk_bytes() as f64 / n);
}
