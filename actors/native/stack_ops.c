/* Every fused decoder layer of a forward in one call: the loop over layers that
 * actors/fused.py otherwise runs in Python, nine native calls a layer. A decoding step of
 * the 1.5B spent several milliseconds per step in those calls' Python side (argument
 * checks, tensor allocation, ctypes); here the same functions run in the same order on
 * the same data, so every row gets the bits the per-layer path gives it.
 *
 * Applies when every sequence in the forward attends row by row (decoding steps,
 * verifies; not prompt chunks, not sparse layers): see FusedStack.covers in fused.py.
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

int specray_matmul_many(int count, const int *types, const uint8_t *const *ws, const int64_t *ns,
                        const float *const *bias, const float *x, int64_t M, int64_t K, const float *residual,
                        float *out, int threads, void *scratch);
int64_t specray_scratch_bytes(int64_t M, int64_t K);
void specray_rmsnorm(const float *x, int64_t M, int64_t K, const float *w, float eps, float *out);
void specray_rope_store(float *qkv, int64_t T, int64_t ld, int H, int Hkv, int D, const float *cos,
                        const float *sin, float *kc, float *vc, int64_t cap, int64_t start);
int specray_attend_rows(const float *q, int64_t T, int64_t ldq, int H, int Hkv, int D, const float *kc,
                        const float *vc, int64_t cap, const int64_t *lo, const int64_t *n, const int64_t *off,
                        const int64_t *idx, float scale, float *out, int threads);
void specray_swiglu(const float *gu, int64_t M, int64_t I, float *out);

/* Weights sharing one input, multiplied in one call (Products in layer.py). */
typedef struct {
    int32_t count, has_bias;
    int32_t types[4];
    const uint8_t *ws[4];
    int64_t ns[4];
    const float *bias[4];
} Product;

typedef struct {
    const float *attn_norm, *mlp_norm;
    float attn_eps, mlp_eps;
    Product qkv, wo, gate_up, down;
} Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter;
    float scale;
} Dims;

/* One sequence's rows [row0, row0 + T) of the forward and where they go in its cache. */
typedef struct {
    int64_t row0, T, start, cap, layer_stride; /* layer_stride: floats from one layer's K (V) to the next */
    float *kc, *vc;                            /* layer 0's [kv_heads, cap, head_dim] */
    const float *cos, *sin;                    /* [T, head_dim]: each row's position */
    const int64_t *lo, *n, *off, *idx;         /* the slots each row sees (slot_table in layer.py) */
} Seq;

static int64_t up64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

static int64_t qkv_width(const Dims *d) { return (d->heads + 2 * d->kv_heads) * d->head_dim; }

/* Bytes of workspace a forward of M rows needs. */
int64_t specray_stack_workspace(const Dims *d, int64_t M) {
    int64_t f = sizeof(float), widest = d->hidden > d->inter ? d->hidden : d->inter;
    if (d->heads * d->head_dim > widest) widest = d->heads * d->head_dim;
    return up64(M * d->hidden * f) * 2 + up64(M * qkv_width(d) * f) + up64(M * d->heads * d->head_dim * f) +
           up64(M * 2 * d->inter * f) + up64(M * d->inter * f) + 2 * up64(specray_scratch_bytes(M, widest));
}

static int product(const Product *p, const float *x, int64_t M, int64_t K, const float *residual, float *out,
                   int threads, void *scratch) {
    return specray_matmul_many(p->count, p->types, p->ws, p->ns, p->has_bias ? p->bias : NULL, x, M, K, residual,
                               out, threads, scratch);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Wall time into seconds[0] (products) or seconds[1] (the other layer ops), when given. */
#define TIMED(slot, call)                                 \
    do {                                                  \
        double t0_ = seconds ? now() : 0.0;               \
        call;                                             \
        if (seconds) seconds[slot] += now() - t0_;        \
    } while (0)

/* x [M, hidden] through n_layers layers, in place. 0, or a negative code naming the layer
 * (-(1000 * layer + 1..4): which product refused, -(1000 * layer + 5): attention).
 * `seconds` (NULL, or 2 doubles): where the time went, for benchmarks/step_profile.py. */
int specray_stack_forward(const Layer *layers, int n_layers, const Dims *d, const Seq *seqs, int n_seqs, float *x,
                          int64_t M, int threads, void *work, double *seconds) {
    int64_t f = sizeof(float), hid = d->hidden, hd = d->heads * d->head_dim, nqkv = qkv_width(d);
    int H = (int)d->heads, Hkv = (int)d->kv_heads, D = (int)d->head_dim;
    char *w = (char *)work;
    float *x2 = (float *)w;
    float *xn = (float *)(w += up64(M * hid * f));
    float *qkv = (float *)(w += up64(M * hid * f));
    float *o = (float *)(w += up64(M * nqkv * f));
    float *gu = (float *)(w += up64(M * hd * f));
    float *act = (float *)(w += up64(M * 2 * d->inter * f));
    void *scratch = w + up64(M * d->inter * f);
    for (int l = 0; l < n_layers; l++) {
        const Layer *L = layers + l;
        int code = -1000 * l, rc = 0;
        TIMED(1, specray_rmsnorm(x, M, hid, L->attn_norm, L->attn_eps, xn));
        TIMED(0, rc = product(&L->qkv, xn, M, hid, NULL, qkv, threads, scratch));
        if (rc) return code - 1;
        for (int s = 0; s < n_seqs; s++) {
            const Seq *S = seqs + s;
            float *rows = qkv + S->row0 * nqkv, *kc = S->kc + l * S->layer_stride, *vc = S->vc + l * S->layer_stride;
            TIMED(1, specray_rope_store(rows, S->T, nqkv, H, Hkv, D, S->cos, S->sin, kc, vc, S->cap, S->start));
            TIMED(1, rc = specray_attend_rows(rows, S->T, nqkv, H, Hkv, D, kc, vc, S->cap, S->lo, S->n, S->off,
                                              S->idx, d->scale, o + S->row0 * hd, threads));
            if (rc) return code - 5;
        }
        TIMED(0, rc = product(&L->wo, o, M, hd, x, x2, threads, scratch));
        if (rc) return code - 2;
        TIMED(1, specray_rmsnorm(x2, M, hid, L->mlp_norm, L->mlp_eps, xn));
        TIMED(0, rc = product(&L->gate_up, xn, M, hid, NULL, gu, threads, scratch));
        if (rc) return code - 3;
        TIMED(1, specray_swiglu(gu, M, d->inter, act));
        TIMED(0, rc = product(&L->down, act, M, d->inter, x2, x, threads, scratch));
        if (rc) return code - 4;
    }
    return 0;
}
