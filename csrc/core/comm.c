/* MPI loaded at run time (MPICH ABI) and the TCP rendezvous: comm.h. */
#define _GNU_SOURCE /* dlopen flags, getaddrinfo, nanosleep */
#include "comm.h"

#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

size_t af_comm_type_size(af_comm_type type) {
    switch (type) {
    case AF_COMM_F32: return 4;
    case AF_COMM_F64: return 8;
    case AF_COMM_I64: return 8;
    default: return 1;
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

/* ---------------------------------------------------------------------------------- */
/* The MPICH ABI: handles are ints with the values of MPICH's mpi.h (stable since MPICH 3.1,
 * shared by Intel MPI, MVAPICH and Cray MPICH). Declared here so that afire needs no MPI
 * headers to build. */

typedef int mpi_handle; /* MPI_Comm, MPI_Datatype, MPI_Op, MPI_Request, MPI_Errhandler, MPI_Info */
typedef struct {
    int count_lo, count_hi_and_cancelled, source, tag, error;
} mpi_status;

#define ABI_COMM_WORLD ((mpi_handle)0x44000000)
#define ABI_COMM_NULL ((mpi_handle)0x04000000)
#define ABI_REQUEST_NULL ((mpi_handle)0x2c000000)
#define ABI_INFO_NULL ((mpi_handle)0x1c000000)
#define ABI_ERRORS_RETURN ((mpi_handle)0x54000001)
#define ABI_BYTE ((mpi_handle)0x4c00010d)
#define ABI_FLOAT ((mpi_handle)0x4c00040a)
#define ABI_DOUBLE ((mpi_handle)0x4c00080b)
#define ABI_INT64 ((mpi_handle)0x4c00083a)
#define ABI_OP_MAX ((mpi_handle)0x58000001)
#define ABI_OP_MIN ((mpi_handle)0x58000002)
#define ABI_OP_SUM ((mpi_handle)0x58000003)
#define ABI_IN_PLACE ((void *)-1)
#define ABI_STATUS_IGNORE ((mpi_status *)1)
#define ABI_THREAD_SERIALIZED 2
#define ABI_COMM_TYPE_SHARED 1
#define ABI_MAX_LIBRARY_VERSION_STRING 8192
#define ABI_MAX_ERROR_STRING 512

/* The functions afire calls, resolved with dlsym. */
typedef struct {
    int (*Initialized)(int *flag);
    int (*Finalized)(int *flag);
    int (*Init_thread)(int *argc, char ***argv, int required, int *provided);
    int (*Finalize)(void);
    int (*Abort)(mpi_handle comm, int code);
    int (*Comm_dup)(mpi_handle comm, mpi_handle *out);
    int (*Comm_free)(mpi_handle *comm);
    int (*Comm_rank)(mpi_handle comm, int *rank);
    int (*Comm_size)(mpi_handle comm, int *size);
    int (*Comm_split_type)(mpi_handle comm, int type, int key, mpi_handle info, mpi_handle *out);
    int (*Comm_set_errhandler)(mpi_handle comm, mpi_handle handler);
    int (*Iallreduce)(const void *send, void *recv, int count, mpi_handle type, mpi_handle op,
                      mpi_handle comm, mpi_handle *req);
    int (*Iallgather)(const void *send, int scount, mpi_handle stype, void *recv, int rcount,
                      mpi_handle rtype, mpi_handle comm, mpi_handle *req);
    int (*Ibcast)(void *buf, int count, mpi_handle type, int root, mpi_handle comm,
                  mpi_handle *req);
    int (*Ibarrier)(mpi_handle comm, mpi_handle *req);
    int (*Test)(mpi_handle *req, int *flag, mpi_status *status);
    int (*Error_string)(int code, char *text, int *len);
    int (*Get_library_version)(char *text, int *len);
} mpi_api;

#define API_ENTRY(f) {"MPI_" #f, offsetof(mpi_api, f)}
static const struct {
    const char *name;
    size_t offset;
} api_names[] = {API_ENTRY(Initialized),    API_ENTRY(Finalized),       API_ENTRY(Init_thread),
                 API_ENTRY(Finalize),       API_ENTRY(Abort),           API_ENTRY(Comm_dup),
                 API_ENTRY(Comm_free),      API_ENTRY(Comm_rank),       API_ENTRY(Comm_size),
                 API_ENTRY(Comm_split_type), API_ENTRY(Comm_set_errhandler),
                 API_ENTRY(Iallreduce),     API_ENTRY(Iallgather),      API_ENTRY(Ibcast),
                 API_ENTRY(Ibarrier),       API_ENTRY(Test),            API_ENTRY(Error_string),
                 API_ENTRY(Get_library_version)};

enum { MAX_INFLIGHT = 64 };          /* requests of one af_comm_allreduce_many      */
#define CHUNK_ELEMS ((size_t)1 << 28) /* MPI counts are ints: larger buffers are split */

struct af_comm {
    mpi_api mpi;
    void *lib;
    mpi_handle comm;     /* a duplicate of MPI_COMM_WORLD: afire's traffic stays apart */
    int rank, size, local_rank, local_size;
    int owns_init;       /* 1: afire initialised MPI and finalises it                  */
    int broken, closed;
    int busy;            /* MPI_THREAD_SERIALIZED: one call at a time                  */
    double timeout;
    char version[256];
};

static af_status mpi_failed(af_comm *c, int rc, const char *what) {
    char text[ABI_MAX_ERROR_STRING] = "";
    int len = 0;
    if (c->mpi.Error_string(rc, text, &len) != 0) snprintf(text, sizeof text, "MPI error %d", rc);
    c->broken = 1;
    return af_error(AF_ECOMM, "rank %d of %d: MPI %s failed: %s (another rank may have died)",
                    c->rank, c->size, what, text);
}

static af_status load_api(af_comm *c, const char *library) {
    dlerror();
    c->lib = dlopen(library, RTLD_NOW | RTLD_GLOBAL);
    if (c->lib == NULL)
        return af_error(AF_ENOTSUP, "cannot load the MPI library %s: %s", library, dlerror());
    /* Open MPI's handles are pointers to its own structures: another ABI */
    if (dlsym(c->lib, "ompi_mpi_comm_world") != NULL)
        return af_error(AF_ENOTSUP, "%s is Open MPI, whose ABI afire does not support; use an "
                        "MPICH-ABI library (the `mpich` wheel: pip install -e \".[dist]\", MPICH, "
                        "Intel MPI, MVAPICH, Cray MPICH) with its own mpirun", library);
    for (size_t i = 0; i < sizeof api_names / sizeof api_names[0]; i++) {
        void *sym = dlsym(c->lib, api_names[i].name);
        if (sym == NULL)
            return af_error(AF_ENOTSUP, "the MPI library %s has no %s (MPI-3 is needed)", library,
                            api_names[i].name);
        memcpy((char *)&c->mpi + api_names[i].offset, &sym, sizeof sym);
    }
    return AF_OK;
}

/* Library, version check, MPI_Init_thread, the duplicate communicator and the node split. */
static af_status open_mpi(af_comm *c, const char *library) {
    AF_TRY(load_api(c, library));
    char version[ABI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    if (c->mpi.Get_library_version(version, &len) == 0) {
        version[len > 0 && len < (int)sizeof version ? len : 0] = '\0';
        char *nl = strchr(version, '\n');
        if (nl) *nl = '\0';
        snprintf(c->version, sizeof c->version, "%.255s", version);
    }
    int flag = 0;
    c->mpi.Finalized(&flag);
    if (flag)
        return af_error(AF_ENOTSUP, "MPI was already finalised in this process (it cannot be "
                        "initialised twice)");
    c->mpi.Initialized(&flag);
    if (!flag) {
        int provided = 0;
        int rc = c->mpi.Init_thread(NULL, NULL, ABI_THREAD_SERIALIZED, &provided);
        if (rc != 0) return af_error(AF_ECOMM, "MPI_Init_thread failed (code %d)", rc);
        c->owns_init = 1;
        if (provided < ABI_THREAD_SERIALIZED)
            return af_error(AF_ENOTSUP, "%s provides thread level %d; afire needs "
                            "MPI_THREAD_SERIALIZED (2)", library, provided);
    }
    int rc = c->mpi.Comm_dup(ABI_COMM_WORLD, &c->comm);
    if (rc != 0) {
        c->comm = ABI_COMM_NULL;
        return mpi_failed(c, rc, "Comm_dup");
    }
    c->mpi.Comm_set_errhandler(c->comm, ABI_ERRORS_RETURN);
    c->mpi.Comm_rank(c->comm, &c->rank);
    c->mpi.Comm_size(c->comm, &c->size);
    mpi_handle node = ABI_COMM_NULL;
    rc = c->mpi.Comm_split_type(c->comm, ABI_COMM_TYPE_SHARED, c->rank, ABI_INFO_NULL, &node);
    if (rc != 0) return mpi_failed(c, rc, "Comm_split_type");
    c->mpi.Comm_rank(node, &c->local_rank);
    c->mpi.Comm_size(node, &c->local_size);
    c->mpi.Comm_free(&node);
    return AF_OK;
}

af_status af_comm_mpi_open(af_comm **out, const char *library, double timeout_s) {
    *out = NULL;
    AF_CHECK(library != NULL && library[0] != '\0', AF_EINVAL, "comm: no MPI library given");
    AF_CHECK(timeout_s >= 0.0, AF_EINVAL, "comm: timeout must be >= 0, got %g", timeout_s);
    af_comm *c = af_calloc(1, sizeof *c);
    if (c == NULL) return AF_ENOMEM;
    c->comm = ABI_COMM_NULL;
    c->timeout = timeout_s;
    c->size = 1;
    af_status st = open_mpi(c, library);
    if (st != AF_OK) {
        /* MPI may be initialised: it stays so (it cannot be re-initialised anyway) */
        if (c->comm != ABI_COMM_NULL) c->mpi.Comm_free(&c->comm);
        af_free(c);
        return st;
    }
    *out = c;
    return AF_OK;
}

void af_comm_abort(af_comm *c, int code) {
    if (c != NULL) c->mpi.Abort(ABI_COMM_WORLD, code);
}

af_status af_comm_close(af_comm *c) {
    if (c == NULL || c->closed) return AF_OK;
    if (c->broken) {
        /* a collective is still pending somewhere: finalising would wait for it forever */
        fflush(stdout);
        fflush(stderr);
        c->mpi.Abort(ABI_COMM_WORLD, 1);
    }
    c->closed = 1;
    c->mpi.Comm_free(&c->comm);
    int rc = 0, done = 0;
    c->mpi.Finalized(&done);
    if (c->owns_init && !done) rc = c->mpi.Finalize();
    return rc == 0 ? AF_OK : af_error(AF_ECOMM, "MPI_Finalize failed (code %d)", rc);
}

void af_comm_free(af_comm *c) {
    if (c == NULL) return;
    af_comm_close(c);
    af_free(c);
}

int af_comm_rank(const af_comm *c) { return c->rank; }
int af_comm_size(const af_comm *c) { return c->size; }
int af_comm_local_rank(const af_comm *c) { return c->local_rank; }
int af_comm_local_size(const af_comm *c) { return c->local_size; }
const char *af_comm_library_version(const af_comm *c) { return c->version; }
double af_comm_timeout(const af_comm *c) { return c->timeout; }
int af_comm_broken(const af_comm *c) { return c->broken; }

/* ---------------------------------------------------------------------------------- */
/* Collectives: started non-blocking, then waited for against the deadline             */

/* Claims c for one collective (MPI_THREAD_SERIALIZED: two threads must not call MPI at
 * once, and collectives must be issued in the same order on every rank). */
static af_status enter(af_comm *c, const char *what) {
    AF_CHECK(c != NULL, AF_EINVAL, "comm: NULL communicator");
    if (__atomic_exchange_n(&c->busy, 1, __ATOMIC_ACQUIRE))
        return af_error(AF_EBUSY, "comm: %s while another thread uses this communicator",
                        what);
    if (c->broken || c->closed) {
        __atomic_store_n(&c->busy, 0, __ATOMIC_RELEASE);
        if (c->closed) return af_error(AF_ECOMM, "MPI %s: the communicator is closed", what);
        return af_error(AF_ECOMM, "rank %d of %d: MPI %s: the communicator failed earlier (a "
                        "rank died or hung); the job cannot continue", c->rank, c->size, what);
    }
    return AF_OK;
}

static af_status leave(af_comm *c, af_status st) {
    __atomic_store_n(&c->busy, 0, __ATOMIC_RELEASE);
    return st;
}

/* Polls req[0..n) until all completed. The first 2 ms yield the CPU between polls (MPI
 * progresses during MPI_Test, so a transfer that is under way keeps moving); after that a
 * 50 us sleep keeps a rank waiting for a slower one off the cores it shares with it. */
static af_status wait_all(af_comm *c, int n, mpi_handle *req, const char *what) {
    const double t0 = now_s();
    for (;;) {
        int left = 0;
        for (int i = 0; i < n; i++) {
            if (req[i] == ABI_REQUEST_NULL) continue;
            int done = 0;
            int rc = c->mpi.Test(&req[i], &done, ABI_STATUS_IGNORE);
            if (rc != 0) return mpi_failed(c, rc, what);
            if (done) req[i] = ABI_REQUEST_NULL;
            else left++;
        }
        if (left == 0) return AF_OK;
        double waited = now_s() - t0;
        if (c->timeout > 0 && waited > c->timeout) {
            c->broken = 1;
            return af_error(AF_ECOMM, "rank %d of %d: MPI %s did not complete within %g s "
                            "(AFIRE_COMM_TIMEOUT): another rank died, hangs or stopped early "
                            "(see its output); the job cannot continue", c->rank, c->size, what,
                            c->timeout);
        }
        if (waited < 2e-3) sched_yield();
        else sleep_s(50e-6);
    }
}

static mpi_handle abi_type(af_comm_type t) {
    switch (t) {
    case AF_COMM_F32: return ABI_FLOAT;
    case AF_COMM_F64: return ABI_DOUBLE;
    case AF_COMM_I64: return ABI_INT64;
    default: return ABI_BYTE;
    }
}

static mpi_handle abi_op(af_comm_op op) {
    return op == AF_COMM_MAX ? ABI_OP_MAX : op == AF_COMM_MIN ? ABI_OP_MIN : ABI_OP_SUM;
}

static af_status allreduce_many(af_comm *c, int n, void *const *buf, const size_t *count,
                                af_comm_type type, af_comm_op op, const char *what) {
    AF_CHECK(n >= 0 && (n == 0 || (buf != NULL && count != NULL)), AF_EINVAL,
             "comm: allreduce of %d buffers", n);
    AF_CHECK(type != AF_COMM_BYTE || op == AF_COMM_MAX || op == AF_COMM_MIN, AF_EINVAL,
             "comm: bytes can only be reduced with max or min");
    mpi_handle req[MAX_INFLIGHT];
    int nreq = 0;
    const size_t esz = af_comm_type_size(type);
    for (int i = 0; i < n; i++) {
        char *p = buf[i];
        for (size_t done = 0; done < count[i];) {
            size_t m = count[i] - done < CHUNK_ELEMS ? count[i] - done : CHUNK_ELEMS;
            if (nreq == MAX_INFLIGHT) { /* the window is full: drain it */
                AF_TRY(wait_all(c, nreq, req, what));
                nreq = 0;
            }
            int rc = c->mpi.Iallreduce(ABI_IN_PLACE, p + done * esz, (int)m, abi_type(type),
                                       abi_op(op), c->comm, &req[nreq]);
            if (rc != 0) return mpi_failed(c, rc, what); /* broken: close() aborts */
            nreq++;
            done += m;
        }
    }
    return wait_all(c, nreq, req, what);
}

af_status af_comm_allreduce_many(af_comm *c, int n, void *const *buf, const size_t *count,
                                 af_comm_type type, af_comm_op op, const char *what) {
    AF_TRY(enter(c, what));
    return leave(c, allreduce_many(c, n, buf, count, type, op, what));
}

af_status af_comm_allreduce(af_comm *c, void *buf, size_t count, af_comm_type type,
                            af_comm_op op, const char *what) {
    return af_comm_allreduce_many(c, 1, &buf, &count, type, op, what);
}

static af_status allgather(af_comm *c, const void *send, void *recv, size_t bytes,
                           const char *what) {
    AF_CHECK(bytes <= (size_t)INT32_MAX, AF_EINVAL, "comm: allgather of %zu bytes per rank "
             "(at most 2^31 - 1)", bytes);
    AF_CHECK(send != NULL && recv != NULL, AF_EINVAL, "comm: allgather of a NULL buffer");
    mpi_handle req = ABI_REQUEST_NULL;
    int rc = c->mpi.Iallgather(send, (int)bytes, ABI_BYTE, recv, (int)bytes, ABI_BYTE, c->comm,
                               &req);
    if (rc != 0) return mpi_failed(c, rc, what);
    return wait_all(c, 1, &req, what);
}

af_status af_comm_allgather(af_comm *c, const void *send, void *recv, size_t bytes,
                            const char *what) {
    AF_TRY(enter(c, what));
    return leave(c, allgather(c, send, recv, bytes, what));
}

static af_status broadcast(af_comm *c, void *buf, size_t bytes, int root, const char *what) {
    AF_CHECK(root >= 0 && root < c->size, AF_EINVAL, "comm: broadcast root %d of %d ranks", root,
             c->size);
    mpi_handle req[MAX_INFLIGHT];
    int nreq = 0;
    for (size_t done = 0; done < bytes;) {
        size_t m = bytes - done < CHUNK_ELEMS ? bytes - done : CHUNK_ELEMS;
        if (nreq == MAX_INFLIGHT) {
            AF_TRY(wait_all(c, nreq, req, what));
            nreq = 0;
        }
        int rc = c->mpi.Ibcast((char *)buf + done, (int)m, ABI_BYTE, root, c->comm, &req[nreq]);
        if (rc != 0) return mpi_failed(c, rc, what);
        nreq++;
        done += m;
    }
    return wait_all(c, nreq, req, what);
}

af_status af_comm_broadcast(af_comm *c, void *buf, size_t bytes, int root, const char *what) {
    AF_TRY(enter(c, what));
    return leave(c, broadcast(c, buf, bytes, root, what));
}

static af_status barrier(af_comm *c, const char *what) {
    mpi_handle req = ABI_REQUEST_NULL;
    int rc = c->mpi.Ibarrier(c->comm, &req);
    if (rc != 0) return mpi_failed(c, rc, what);
    return wait_all(c, 1, &req, what);
}

af_status af_comm_barrier(af_comm *c, const char *what) {
    AF_TRY(enter(c, what));
    return leave(c, barrier(c, what));
}

static af_status reducer_allreduce(void *ctx, void *buf, size_t count, af_comm_type type,
                                   af_comm_op op, const char *what) {
    return af_comm_allreduce((af_comm *)ctx, buf, count, type, op, what);
}

af_reducer af_comm_reducer(af_comm *c) { return (af_reducer){c, reducer_allreduce}; }

/* ---------------------------------------------------------------------------------- */
/* TCP rendezvous (only the NCCL unique id travels this way)                           */

typedef struct {
    uint32_t magic, world, rank, bytes;
} hello;
#define HELLO_MAGIC 0x61466952u /* "aFiR" */

static int remaining_ms(double deadline) {
    double left = deadline - now_s();
    return left <= 0 ? 0 : left > 1e6 ? 1000000000 : (int)(left * 1000) + 1;
}

/* Sends / receives exactly n bytes before the deadline; 0 on success. */
static int io_all(int fd, void *buf, size_t n, double deadline, int sending) {
    char *p = buf;
    while (n > 0) {
        struct pollfd pf = {fd, sending ? POLLOUT : POLLIN, 0};
        int ms = remaining_ms(deadline);
        if (ms == 0 || poll(&pf, 1, ms) <= 0) return -1;
        ssize_t k = sending ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static af_status rendezvous_root(void *buf, size_t bytes, int world, int port, double deadline,
                                 double timeout_s) {
    int fd = socket(AF_INET6, SOCK_STREAM, 0), v6 = fd >= 0;
    if (!v6) fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return af_error(AF_ECOMM, "rendezvous: socket() failed: %s", strerror(errno));
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int rc;
    if (v6) { /* dual stack: IPv4 peers connect too */
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        struct sockaddr_in6 a = {0};
        a.sin6_family = AF_INET6;
        a.sin6_addr = in6addr_any;
        a.sin6_port = htons((uint16_t)port);
        rc = bind(fd, (struct sockaddr *)&a, sizeof a);
    } else {
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_ANY);
        a.sin_port = htons((uint16_t)port);
        rc = bind(fd, (struct sockaddr *)&a, sizeof a);
    }
    if (rc != 0 || listen(fd, world) != 0) {
        int e = errno;
        close(fd);
        return af_error(AF_ECOMM, "rendezvous: rank 0 cannot listen on port %d: %s (set "
                        "AFIRE_MASTER_PORT to a free port)", port, strerror(e));
    }
    unsigned char *seen = af_calloc((size_t)world, 1);
    if (seen == NULL) {
        close(fd);
        return AF_ENOMEM;
    }
    af_status st = AF_OK;
    for (int joined = 1; joined < world && st == AF_OK;) {
        struct pollfd pf = {fd, POLLIN, 0};
        int ms = remaining_ms(deadline);
        if (ms == 0 || poll(&pf, 1, ms) <= 0) {
            st = af_error(AF_ECOMM, "rendezvous: only %d of %d ranks reached rank 0 on port %d "
                          "within %g s (AFIRE_COMM_TIMEOUT); check MASTER_ADDR/MASTER_PORT and "
                          "that every rank was started", joined, world, port, timeout_s);
            break;
        }
        int peer = accept(fd, NULL, NULL);
        if (peer < 0) continue;
        hello h;
        if (io_all(peer, &h, sizeof h, deadline, 0) != 0 || h.magic != HELLO_MAGIC) {
            close(peer); /* not one of ours (a port scanner, another job): ignore it */
            continue;
        }
        if (h.world != (uint32_t)world || h.rank == 0 || h.rank >= (uint32_t)world ||
            seen[h.rank] || h.bytes != (uint32_t)bytes) {
            st = af_error(AF_ECOMM, "rendezvous: a process claiming rank %u of %u joined a job "
                          "of %d ranks on port %d (two jobs on one port, or a rank started "
                          "twice?)", h.rank, h.world, world, port);
            close(peer);
            break;
        }
        hello reply = {HELLO_MAGIC, (uint32_t)world, 0, (uint32_t)bytes};
        if (io_all(peer, &reply, sizeof reply, deadline, 1) != 0 ||
            io_all(peer, buf, bytes, deadline, 1) != 0) {
            close(peer);
            continue; /* it may reconnect */
        }
        seen[h.rank] = 1;
        joined++;
        close(peer);
    }
    af_free(seen);
    close(fd);
    return st;
}

static af_status rendezvous_peer(void *buf, size_t bytes, int rank, int world, const char *addr,
                                 int port, double deadline, double timeout_s) {
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    const char *last = "no attempt";
    while (remaining_ms(deadline) > 0) {
        int g = getaddrinfo(addr, service, &hints, &res);
        if (g != 0) {
            last = gai_strerror(g);
            sleep_s(0.2);
            continue;
        }
        for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
            int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
            if (fd < 0) continue;
            if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
                last = strerror(errno);
                close(fd);
                continue;
            }
            hello h = {HELLO_MAGIC, (uint32_t)world, (uint32_t)rank, (uint32_t)bytes}, reply;
            if (io_all(fd, &h, sizeof h, deadline, 1) == 0 &&
                io_all(fd, &reply, sizeof reply, deadline, 0) == 0 && reply.magic == HELLO_MAGIC &&
                reply.world == (uint32_t)world && reply.bytes == (uint32_t)bytes &&
                io_all(fd, buf, bytes, deadline, 0) == 0) {
                close(fd);
                freeaddrinfo(res);
                return AF_OK;
            }
            last = "the listener did not answer as afire's rank 0";
            close(fd);
        }
        freeaddrinfo(res);
        res = NULL;
        sleep_s(0.2); /* rank 0 may not listen yet */
    }
    return af_error(AF_ECOMM, "rendezvous: rank %d could not reach rank 0 at %s:%d within %g s "
                    "(AFIRE_COMM_TIMEOUT; last error: %s); check MASTER_ADDR/MASTER_PORT and "
                    "that rank 0 runs", rank, addr, port, timeout_s, last);
}

af_status af_rendezvous_broadcast(void *buf, size_t bytes, int rank, int world, const char *addr,
                                  int port, double timeout_s) {
    AF_CHECK(world >= 1 && rank >= 0 && rank < world, AF_EINVAL,
             "rendezvous: rank %d of %d ranks", rank, world);
    AF_CHECK(port > 0 && port < 65536, AF_EINVAL, "rendezvous: port %d is not a TCP port", port);
    AF_CHECK(bytes <= (1u << 20) && (buf != NULL || bytes == 0), AF_EINVAL,
             "rendezvous: %zu bytes (at most 1 MiB)", bytes);
    AF_CHECK(rank == 0 || (addr != NULL && addr[0] != '\0'), AF_EINVAL,
             "rendezvous: no address of rank 0 (MASTER_ADDR)");
    if (world == 1) return AF_OK;
    const double t = timeout_s > 0 ? timeout_s : 1e9, deadline = now_s() + t;
    if (rank == 0) return rendezvous_root(buf, bytes, world, port, deadline, t);
    return rendezvous_peer(buf, bytes, rank, world, addr, port, deadline, t);
}
