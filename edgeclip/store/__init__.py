"""The bundle store: a versioned directory every stage reads and writes.

Layout::

    BUNDLE/
      CURRENT                 name of the active version ("v0003"), replaced atomically
      versions/v0001/         one complete version: manifest.json, *.safetensors, small files
      graphs/<sha256>.onnx    the shared graph store: immutable, content-named ONNX graphs and their
      graphs/<sha256>.data    external weights, each stored once per bundle (docs/EXPORT.md, "Graph store")
      .staging-*/             a version being written; never read, removed when stale
      .lock                   the writers' advisory lock (readers never take it)

A version's manifest names its graphs by role (``graphs/gated.onnx``, ``graphs/image_encoder.data``);
an entry with ``"blob": true`` lies in the store as ``graphs/<sha256><suffix>``. A stored graph's
external-data locations are plain names of ``.data`` files beside it in the store, every one of
which the version lists too, so stock ``onnx.load`` reads any graph of any version: no hard link,
no symlink, no ``..``.

A change never edits a version: it writes a complete new one in a staging folder, renames
it into ``versions/`` and only then replaces ``CURRENT``. A writer killed at any point
leaves the previous version loadable. Tensors are safetensors, metadata JSON; no pickle.

Concurrency: a writer takes the lock when it starts writing (``Bundle.new_version``) and keeps
it until CURRENT is switched. Its parent was read before, without the lock, so the writer checks
that CURRENT still names its parent, when it takes the lock and again at commit (compare and
swap): a writer that lost a race raises ``BundleError`` and changes nothing. Readers never block.

Containment: every file name in a manifest is a plain relative name (``edgeclip.manifest``); every
file is opened only after ``lstat`` showed a regular file reached through real folders (no symlink,
no device, no fifo). Error messages name bundle files by their manifest name only.

Fast open: ``Bundle.open`` reads the manifest and ``lstat``s the files (sizes). A file's content
is verified by sha256 the first time a command uses it (``Bundle.path``); a verified file gets a
stamp (size, mtime_ns, inode) in a cache outside the bundle (``stamps_dir``), and a later use
whose stamp matches skips the hash.
``Bundle.verify`` (``edgeclip verify``) hashes everything regardless of stamps.

Modules, one job each: ``fs`` (fixed names, containment, atomic writes, one-line OS errors), ``stamps``
(verification stamps outside the bundle), ``lock`` (the writers' lock, clean-up of killed writers),
``graphs`` (external data of ONNX graphs), ``reader`` (``Bundle``, versions, CURRENT), ``writer``
(``VersionWriter``, ``create_bundle``), ``retention`` (rollback, prune, history, sizes), ``verify``
(``verify_bundle``). ``edgeclip.bundle`` re-exports the public names.
"""
