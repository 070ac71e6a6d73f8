use arroy::distances::BinaryQuantizedManhattan;
use heed::{CommitOrAbort, EnvOpenOptions};
use rand::SeedableRng;
fn main() {
    let n: u32 = std::env::args().nth(1).unwrap().parse().unwrap();
    let trees: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let split: usize = std::env::args().nth(3).unwrap().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = unsafe { EnvOpenOptions::new().map_size(1 << 34).open(dir.path()) }.unwrap();
    let wtxn = env.write_txn().unwrap();
    let db: arroy::Database<BinaryQuantizedManhattan> = env
        .create_databases_and_commit(wtxn, |dbo, wtxn| -> heed::Result<_> {
            dbo.create_database(wtxn, None)
                .map(CommitOrAbort::<_, ()>::Commit)
        })
        .unwrap()
        .unwrap_commit();
    let g = indexer::bench::synthetic::Generator::new(1);
    let mut wtxn = env.write_txn().unwrap();
    let w = arroy::Writer::<BinaryQuantizedManhattan>::new(db, 0, 256);
    let mut v = [0f32; 256];
    let mut id = 0u32;
    'o: for img in 0.. {
        for d in g.image(img) {
            indexer::hamming::to_arroy_vector(&d, &mut v);
            w.add_item(&mut wtxn, id, &v).unwrap();
            id += 1;
            if id >= n {
                break 'o;
            }
        }
    }
    let t = std::time::Instant::now();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    w.builder(&mut rng)
        .n_trees(trees)
        .split_after(split)
        .build(&mut wtxn)
        .unwrap();
    wtxn.commit().unwrap();
    let rtxn = env.read_txn().unwrap();
    let st = db.stat(&rtxn).unwrap();
    let pages = st.branch_pages + st.leaf_pages + st.overflow_pages;
    println!(
        "n={n} trees={trees} split={split}: entries {} pages {} bytes/item {:.1} build {:.1}s",
        st.entries,
        pages,
        pages as f64 * 4096.0 / n as f64,
        t.elapsed().as_secs_f64()
    );
}
