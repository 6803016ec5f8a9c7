"""Default configuration: the paper's best setting on the synthetic MARD corpus.

Every other config calls `get_config()` from here and changes only what differs.
Override any field from the command line, e.g. `--config.data.vocab_size=30000`.
"""

import ml_collections


def get_config():
  """Returns the default config."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds everything random that is not data layout.

  # --- Raw data -----------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  # Raw MARD directory (mard_metadata.json, mard_reviews.json,
  # acousticbrainz_descriptors/). Empty: a synthetic corpus is generated in
  # WORKDIR/synthetic_mard and used.
  config.data.mard_dir = ''
  # Extra directories with AcousticBrainz documents for every track
  # (the paper's expanded set): comma-separated, absolute or relative to
  # mard_dir. `acousticbrainz_expanded` inside mard_dir is always searched.
  config.data.extra_descriptor_dirs = ''
  # Where TFRecords + manifest go. Empty: WORKDIR/data.
  config.data.tfrecord_dir = ''
  # Descriptor list: a named set ('paper' = the paper's 369 values) or a
  # comma-separated list of `path[:shape]` entries (see mardjax/descriptors.py).
  config.data.descriptors = 'paper'
  # Stable transform applied before standardisation: 'signed_log' or 'none'.
  config.data.transform = 'signed_log'
  # Word vocabulary: the N most frequent training words (+ <pad>, <unk>).
  # Frozen pretrained text encoder (the paper's BERT row): a local Hugging
  # Face model directory; preprocessing stores its features of every review
  # for model.text_encoder='pretrained'. '' = none.
  config.data.text_encoder_path = ''
  config.data.text_encoder_max_tokens = 256  # Word pieces per review.
  config.data.vocab_size = 60000
  config.data.min_word_count = 1  # Words seen fewer times map to <unk>.
  config.data.max_len = 400  # Reviews are truncated to this many tokens.
  # Review-level dev split: this fraction of album-review matches, by a
  # deterministic hash of the review id (the paper withholds 10%).
  config.data.dev_fraction = 0.1
  # Album-level test split: albums never seen in training.
  config.data.test_album_fraction = 0.1
  config.data.split_salt = 'mardjax-split-v1'  # Change to draw new splits.
  config.data.examples_per_shard = 20000  # Review records per TFRecord file.
  config.data.albums_per_shard = 5000  # Album records per TFRecord file.
  config.data.num_workers = 2  # Processes parsing descriptor documents.
  # Preprocessing whose input and output counts disagree (records lost
  # without a counted reason) exits non-zero and is not trained on; True
  # accepts it with the warning.
  config.data.accept_unreconciled = False
  # Follow symlinks in the MARD folders whose targets lie outside them.
  config.data.follow_outside_links = False
  # Largest descriptor document or metadata/review line read, in MB (0: any).
  config.data.max_document_mb = 64.0

  # --- Synthetic corpus (mode=synth, and the default data) -----------------
  config.data.synth_preset = 'small'  # 'tiny' (tests), 'small', 'full' (MARD size).
  config.data.synth_seed = 0
  # Overrides of the preset's sizes; 0 keeps the preset's value.
  config.data.synth_num_albums = 0
  config.data.synth_num_reviews = 0
  config.data.synth_num_tracks = 0
  # How the catalogue reads and sounds (mardjax.data.synth.Style; these
  # defaults write the original corpus): the spread of reviews and tracks
  # over albums (log-normal sigmas), the fraction of single-track albums,
  # the noise of a reviewer's impression of the sound (larger: words follow
  # the sound less), and the shares of sentences on the sound, the genre,
  # off-topic matters, opinion, and naming the album (< 0: within filler).
  config.data.synth_style = ml_collections.ConfigDict(dict(
      review_tail=1.3, track_tail=0.6, single_track=0.0,
      impression_noise=0.6, trait=0.45, genre=0.10, offtopic=0.13,
      opinion=0.10, naming=-1.0))

  # --- Model (paper sizes) -------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.text_encoder = 'mean'  # 'mean', 'lstm' or 'pretrained'.
  config.model.audio_encoder = 'track'  # 'track' or 'album_lstm'.
  # Mean encoder: 'mean' (the paper's plain mean) or 'idf' (a learned
  # weight per word, initialised to its inverse document frequency).
  config.model.pooling = 'mean'
  # Regularisation in training (0: off, the paper): dropout on both heads'
  # hidden layers, and the fraction of a review's words the mean encoder
  # skips (word dropout).
  config.model.dropout = 0.0
  config.model.word_dropout = 0.0
  config.model.max_tracks = 32  # album_lstm: an album's first tracks read.
  config.model.word_dim = 256  # Word embedding size (text embedding).
  config.model.hidden_dim = 256  # Hidden layer of each branch's head.
  config.model.embed_dim = 128  # The joint embedding space.
  config.model.lstm_dim = 256  # LSTM hidden size (text and album LSTMs).
  # The text BiLSTM's two directions: 'per_direction' (a loop each),
  # 'bidirectional' (both in one loop: half the sequential positions) or
  # 'auto' (see two_branch.lstm_loop). The same function and parameters.
  config.model.lstm_loop = 'auto'
  config.model.linear = False  # One Dense per branch (WSABIE-like row).
  # A Dense beside each head's Dense-ReLU-Dense, the two summed (a residual
  # linear path; ignored with `linear`).
  config.model.linear_path = False
  config.model.batch_norm = True  # BN after the last linear layer (Wang et al.).
  # How the parameters start: 'random' (the paper), or 'prototypes' (linear
  # mean-encoder models: each word starts at the mean sound of its training
  # albums in the sound's principal directions; mardjax/train/prototype_init.py),
  # each word's mean shrunk as n / (n + prototype_shrink) over its n albums.
  config.model.init = 'random'
  config.model.prototype_shrink = 1.0

  # --- Loss -----------------------------------------------------------------
  config.loss = ml_collections.ConfigDict()
  config.loss.kind = 'ranking'  # 'ranking', 'infonce' or 'sigmoid'.
  config.loss.margin = 0.05  # m of the hinge terms.
  # Weights of audio->text, text->audio, audio-audio and text-text terms.
  config.loss.weights = (1.0, 1.0, 0.1, 0.1)
  # 'all', 'sampled:K', 'hardest:K' or 'hardest:K+sampled:S' (both).
  config.loss.negatives = 'sampled:10'
  config.loss.temperature = 0.07  # InfoNCE / sigmoid.
  config.loss.sigmoid_bias = -10.0  # Sigmoid loss bias init.
  config.loss.gather_across_devices = False  # Negatives from the global batch.

  # --- Training -------------------------------------------------------------
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128  # Global batch (all devices, all hosts).
  config.train.learning_rate = 1e-3  # optax Adam (peak, after warmup).
  # Learning rate against the batch size: 'none', 'linear' or 'sqrt'
  # (x (batch_size / lr_base_batch) or its square root).
  config.train.lr_scaling = 'none'
  config.train.lr_base_batch = 128
  config.train.warmup_steps = 0  # Linear warmup from 0 to the peak.
  # After warmup: 'constant' (the paper) or 'cosine' (decays to
  # lr_final_fraction of the peak at the last step).
  config.train.lr_schedule = 'constant'
  config.train.lr_final_fraction = 0.0
  # Word-embedding table: 'lazy' updates only the rows a batch uses (lazy
  # Adam: its cost follows the batch's distinct words, not the 60k-word
  # table, which wins where a pass over the whole table dominates the step,
  # as on CPUs); 'dense' is plain Adam on all rows (one fused pass at memory
  # speed, which wins on accelerators); 'auto' picks by backend (chosen by
  # the train benchmark; see docs/performance.md).
  config.train.embedding_update = 'auto'
  # Products and activations: 'float32' or 'bfloat16' (parameters,
  # optimizer state and the loss's distances stay float32).
  config.train.compute_dtype = 'float32'
  # Lazy: distinct ids padded to a multiple of this. Each new multiple a run
  # meets compiles the step once more; a larger bucket compiles less and
  # pads more, so every step pays for the padding (chosen by the train_loop
  # benchmark; see docs/performance.md).
  config.train.vocab_bucket = 1024
  # Where each step's batch is built: 'device' (the data copied to the
  # devices once, indices sent per step; every model), 'host', or 'auto'
  # (device, but host for the lazy update on CPUs, where the device is the
  # host's own cores and gathers moved into the step lengthen it; chosen by
  # the train_loop benchmark; see docs/performance.md).
  config.train.batch_assembly = 'auto'
  # Steps per dispatch (a lax.scan in one program) with batches assembled on
  # the device; 0: auto (1 on CPUs; on accelerators the largest count, up to
  # 32, that divides log_every, checkpoint_every and eval_every, 25 here, and
  # holds at most 65,536 examples of one process: 5 at batch 8,192).
  config.train.steps_per_dispatch = 0
  # LSTM encoder: reviews packed end to end into rows of max_len, so the
  # LSTM skips padding; rows rounded up to a multiple of this (0: padded).
  config.train.lstm_pack_rows = 8
  # Dispatches whose batches the host builds ahead, in a thread, while the
  # step runs (each steps_per_dispatch batches; 0: none, in the loop's
  # thread); -1: auto (none on CPUs, where the step already runs
  # asynchronously on the same cores, 2 on accelerators).
  config.train.prefetch_batches = -1
  # Mean encoder, dense update: training reads only the batch's real tokens,
  # end to end (no padding); their count is rounded up to a multiple of this,
  # and to at least the mean + 4 standard deviations of a batch's tokens,
  # so that one size (one program) serves nearly every batch (at MARD's
  # lengths 20,480 at batch 128, 126,976 at 1,024), 0: the padded
  # (batch, max_len) layout.
  config.train.token_bucket = 4096
  # Mean encoder, lazy update: the bag-of-words product covers the batch's
  # first 1,024 words by id (ids rank words by frequency) and the other
  # words' tokens are summed one by one (their count rounded up to a
  # multiple of vocab_bucket); False: the product over all of the batch's
  # words. Same features; the split keeps the product to the frequent words,
  # which hold most of a review's tokens, and sums the few rare tokens one
  # by one, which pays on CPUs (the train benchmark's 'split bag' rows; see
  # docs/performance.md).
  config.train.split_bag = True
  # Length of training: num_steps when > 0, else num_epochs over the
  # training reviews (paper: 200 epochs).
  config.train.num_steps = 0
  config.train.num_epochs = 200
  # 'pmap' or 'shard_map' (one process: its mesh holds this process's
  # devices).
  config.train.parallelism = 'pmap'
  # shard_map: 'sharded' splits the optimizer's large leaves (the word
  # table's Adam moments) by rows over the devices: each device keeps and
  # updates 1/N of them, from a reduce-scatter of the gradient, and the
  # updated rows are gathered back; 'replicated' keeps the whole state on
  # every device; 'auto' is 'sharded' under shard_map.
  config.train.optimizer_sharding = 'auto'
  # Leaves of at least this many elements are sharded (each sharded leaf
  # costs two collectives a step, worth it only for the large ones).
  config.train.optimizer_shard_min_size = 65536
  config.train.neighbourhood_sampling = True  # 2+ reviews per album a batch.
  config.train.reviews_per_album = 2  # Group size under neighbourhood sampling.
  # An album with fewer training reviews than a group (most of MARD's), or
  # reviews beyond whole groups: True completes its last group by repeating
  # its reviews, so every review trains each epoch; False leaves them out
  # (single-review albums never train).
  config.train.fill_groups = False
  config.train.log_every = 50  # Steps between progress lines / metrics.
  config.train.checkpoint_every = 1000  # Steps between checkpoints.
  config.train.keep_checkpoints = 3
  config.train.eval_every = 1000  # Steps between dev recall evaluations.
  # Stop after this many evaluations without a better recall@10 on the
  # selection split (eval.validation_fraction) (0: never); the best
  # checkpoint is the run's model either way.
  config.train.early_stop_patience = 0

  # --- Evaluation (--mode=eval) ---------------------------------------------
  config.eval = ml_collections.ConfigDict()
  # 'dev': held-out reviews of training albums; 'test': reviews of albums
  # never seen in training.
  config.eval.split = 'dev'
  config.eval.bootstrap = 1000  # Resamples for the 95% CIs of recall@K.
  # Training's periodic evaluations also measure recall on this many
  # training reviews ('train_recall@K'; 0: off): memorising vs learning.
  config.eval.train_sample = 0
  # Model selection (the best checkpoint, which is the run's model, and
  # early stopping) reads recall@10 on this fraction of the training
  # reviews, held out of training by a hash of the review id (the same
  # reviews every run): dev and test then only report. 0: select on the
  # dev split itself (slightly flattering its figures).
  config.eval.validation_fraction = 0.1
  # Evidence-gated review queries (mardjax/evaluation/word_evidence.py;
  # linear text heads only): a review is read through the words whose use
  # follows the albums' sound, cut at the k of these (comma-separated)
  # that gives the best recall@10 on the selection split, or not at all
  # when the model's own query does better. '': off.
  config.eval.evidence_ks = ''
  # Words of fewer training albums than this keep their full weight.
  config.eval.evidence_min_albums = 5

  # --- Baselines (--mode=baselines) -----------------------------------------
  config.baselines = ml_collections.ConfigDict()
  # Text vectors: mean GloVe vectors from this local file ('word v1 ... vD'
  # per line), else TF-IDF + truncated SVD to text_dim, fitted on training.
  config.baselines.glove_path = ''
  config.baselines.glove_dim = 300
  config.baselines.text_dim = 300
  config.baselines.cca_dims = (50, 100)  # One CCA row per latent size.
  config.baselines.cca_reg = 1e-3  # Ridge, times each side's mean variance.
  config.baselines.wsabie_dim = 100
  config.baselines.wsabie_steps = 2000
  config.baselines.wsabie_batch = 256
  config.baselines.wsabie_samples = 100  # Negatives drawn per pair (WARP).
  config.baselines.wsabie_learning_rate = 1e-2
  config.baselines.wsabie_margin = 0.1

  # --- The corpus suite (--mode=suite) --------------------------------------
  config.suite = ml_collections.ConfigDict()
  # Corpora of mardjax.experiments.suite.CORPORA, comma-separated ('': all).
  config.suite.corpora = ''
  config.suite.seeds = '0,1,2'  # One training run per seed per corpus.
  config.suite.scale = 1.0  # Multiplies every corpus's sizes.
  # Epochs of each run (0: the config's train.num_epochs / num_steps).
  config.suite.num_epochs = 0
  # A recipe trained beside the config on the same data and seeds, as a
  # module with get_config() ('': none); the paper's by default.
  config.suite.reference = 'configs.default'
  # --mode=suite_table1: Table 1's rows (experiments.ablation.ROWS,
  # comma-separated; '': all) on the suite, and per-row step caps
  # ('row:steps,...'; '': each row until early stopping or its epochs).
  config.suite.table1_rows = ''
  config.suite.row_steps = ''

  # --- Table 1 (--mode=ablate) ----------------------------------------------
  config.ablate = ml_collections.ConfigDict()
  # Training steps per row (0: each row's own schedule, the paper's 200
  # epochs); dev recall is also measured `evals` times along the way.
  config.ablate.num_steps = 600
  config.ablate.evals = 4
  # Per-row budgets overriding num_steps: 'row:steps,row:steps' (e.g. the
  # LSTM row, slow on CPUs).
  config.ablate.row_steps = ''
  # Comma-separated paper rows; '' = every row, 'none' = no paper row.
  config.ablate.rows = ''
  # Rows of your own: 'name: field=value field=value; name2: ...', each the
  # given config with those fields changed (README: Table 1).
  config.ablate.variants = ''

  # --- Export (--mode=export) and batch embedding (--mode=embed) -----------
  config.export = ml_collections.ConfigDict()
  # 'exact': brute-force top-k, right up to a few million vectors of 128
  # floats; 'hnsw': a faiss HNSW graph per bank (approximate, sub-linear).
  config.export.index = 'exact'
  config.export.hnsw_m = 32  # Graph neighbours per vector.
  config.export.hnsw_ef_construction = 200  # Candidates kept while building.
  config.export.hnsw_ef_search = 128  # Candidates a query visits (recall).
  config.embed = ml_collections.ConfigDict()
  # Processes running Essentia over a folder (0: one per CPU core).
  config.embed.workers = 0
  # Follow symlinks in --input_dir whose targets lie outside it.
  config.embed.follow_outside_links = False
  # Largest recording or document read from --input_dir, in MB (0: any).
  config.embed.max_document_mb = 512.0

  # --- Serving (--mode=serve) -----------------------------------------------
  config.serve = ml_collections.ConfigDict()
  # Host names the room answers to besides its --host (and, on a loopback
  # --host, localhost/127.0.0.1/::1), comma-separated; others get 421.
  config.serve.allowed_hosts = ''
  # Other sites allowed to POST to the room ('http://host:port', comma-
  # separated); cross-site POSTs are refused with 403 otherwise.
  config.serve.allowed_origins = ''
  config.serve.max_upload_mb = 50.0  # Larger uploads are answered 413.
  config.serve.max_query_kb = 64  # Larger text queries are answered 413.
  # A library of your own tracks searched beside MARD: the output folder of
  # --mode=embed with this workdir ('' = none).
  config.serve.library = ''
  # Processes analysing uploaded recordings (0: one per CPU core).
  config.serve.analysis_workers = 0
  # Analyses before a worker process is replaced (Essentia's memory back).
  config.serve.analyses_per_worker = 20
  # Longest recording analysed, in seconds; longer ones are answered 413.
  config.serve.max_audio_seconds = 900.0
  # Time limit of one analysis (s); past it the worker is killed, 504.
  config.serve.analysis_timeout_s = 120.0
  # Uploads that may wait for a busy worker; more are answered 429.
  config.serve.max_waiting = 8
  # Address space of one worker (MB; 0: no limit); past it 413.
  config.serve.worker_memory_mb = 3072

  # --- Benchmarks (--mode=benchmark) -----------------------------------------
  config.benchmark = ml_collections.ConfigDict()
  # 'data': generate + preprocess the synth_preset corpus; 'train': train-step
  # examples/s of the mean and LSTM encoders at the config's sizes;
  # 'pipeline': input-pipeline examples/s against the train step's; 'eval'
  # and 'serve' below.
  config.benchmark.kind = 'data'
  # Where every kind appends its lines with the machine, versions, commit
  # and date ('<results_dir>/<kind>.jsonl'; '': nowhere). The repository's
  # records are docs/results; `python -m mardjax.experiments.results render`
  # makes docs/performance.md from them.
  config.benchmark.results_dir = ''
  # kind=train and pipeline: each step is timed for at least this long
  # after compiling, starting with `train_steps` steps (LSTM: a tenth).
  config.benchmark.min_seconds = 5.0
  config.benchmark.train_steps = 30
  # kind=train: one line per encoder x batch size x embedding update ('':
  # the config's train.embedding_update) x, for the LSTM, its loop ('': the
  # config's model.lstm_loop; e.g. 'per_direction,bidirectional'). A batch
  # size whose step would not fit in memory is skipped with a line saying
  # why.
  config.benchmark.encoders = 'mean,lstm'
  config.benchmark.batch_sizes = '128,1024,8192'
  # kind=train: path of the PyTorch peer script (torch_twobranch.py), whose
  # variants run in the same run at each encoder and batch size ('': none).
  config.benchmark.peer = ''
  config.benchmark.embedding_updates = ''
  config.benchmark.lstm_loops = ''
  # kind=program: the compiled step's operations at each batch size, for
  # the plan this backend gets (compiled on the machine at hand).
  config.benchmark.program_backend = 'gpu'
  # kind=scaling: device counts, each in a child process with that many
  # devices (forced host devices on a CPU).
  config.benchmark.scaling_devices = '1,2,4,8'
  # ... in each of these parallel forms ('pmap': replicated state;
  # 'shard_map': the optimizer state as train.optimizer_sharding has it).
  config.benchmark.scaling_forms = 'pmap,shard_map'
  config.benchmark.pipeline_batches = 200  # Timed input-pipeline batches.
  # 'eval': metrics time after embedding at this scale (MARD: 65,566 albums,
  # ~26,400 held-out test reviews).
  config.benchmark.eval_albums = 65566
  config.benchmark.eval_reviews = 26397
  config.benchmark.eval_query_albums = 6557  # Test albums holding them.
  # 'serve': the listening room over HTTP on DIR's trained model: upload
  # latency of a synthesised recording, text-query latency, and text
  # queries/s from `serve_concurrency` clients for `serve_seconds`.
  config.benchmark.serve_upload_seconds = 30.0
  config.benchmark.serve_uploads = 5  # Timed uploads per format.
  config.benchmark.serve_text_queries = 200  # Timed one at a time.
  config.benchmark.serve_concurrency = 16
  # Rounds of concurrent uploads with health checks and text queries timed
  # meanwhile (0: skip).
  config.benchmark.serve_rounds = 3
  config.benchmark.serve_concurrent_uploads = 8
  config.benchmark.serve_round_upload_seconds = 10.0
  config.benchmark.serve_seconds = 10.0
  # 'index': exact vs HNSW top-10 latency and recall on this many vectors.
  config.benchmark.index_vectors = 1_000_000
  # kind=train_loop: the training loop on generated tables of MARD's shape.
  # Long enough that compiling and the first evaluation do not dominate.
  config.benchmark.train_loop_steps = 5000
  # The step alone, for comparison, is timed before and after the loop for
  # at least this long each time.
  config.benchmark.loop_step_seconds = 5.0
  config.benchmark.loop_albums = 65566
  config.benchmark.loop_tracks = 343882
  config.benchmark.loop_reviews = 237000
  config.benchmark.loop_dev_reviews = 5000
  config.benchmark.index_queries = 200

  return config
