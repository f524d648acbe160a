// Command memberguard-microcluster-bench is the Go baseline for memberguard's
// native dqlite client over microd's upgraded connection: go-dqlite v3's own
// client (the one microcluster's members use) over a dial made as a member
// makes it.
//
// A member reaches a peer's dqlite through the peer's HTTPS address: TLS
// presenting its own server.crt and server.key, trusting only cluster.crt
// (which every initialised member's listener serves), then
// `POST /core/internal/database` with `Upgrade: dqlite`; after the peer's
// 101 the same stream carries dqlite's wire protocol. --state-dir is the
// member dialled as.
//
// It finds the leader among --cluster and keeps two connections to it, one
// go-dqlite client (LEADER, CLUSTER) and one database connection to --db
// (database/sql pinned with DB.Conn: one QUERY_SQL per call, no prepare
// step). Then it times --n rounds, each of:
//
//   - leader:  client.Leader(), one round trip that reads nothing (the floor);
//   - cluster: client.Cluster(), the leader's Raft configuration;
//   - select:  a primary-key SELECT of core_cluster_members (id = 1), read to
//     the end;
//
// interleaved, so that all three see the same machine noise, and --dials new
// dials (TLS, the upgrade, dqlite's handshake), each closed again. It prints
// one JSON object on stdout:
//
//	{"leader_ms":{"p50":..,"p99":..},"cluster_ms":{..},"select_ms":{..},"dial_ms":{..},"n":N}
//
// plus min/mean/max, the warm-up count and the leader's address; with
// --samples, every timing too ("samples_ms": {"leader_ms": [..], ..}), so
// that a caller can pool several runs. Errors go to stderr with exit status 1
// (2 for bad flags).
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/canonical/go-dqlite/v3/client"
	"github.com/canonical/go-dqlite/v3/driver"
)

const selectMember = "SELECT id, name, address, certificate, role FROM core_cluster_members WHERE id = ?"

type stats struct {
	P50  float64 `json:"p50"`
	P99  float64 `json:"p99"`
	Min  float64 `json:"min"`
	Mean float64 `json:"mean"`
	Max  float64 `json:"max"`
}

type result struct {
	Leader  stats  `json:"leader_ms"`
	Cluster stats  `json:"cluster_ms"`
	Select  stats  `json:"select_ms"`
	Dial    stats  `json:"dial_ms"`
	N       int    `json:"n"`
	Dials   int    `json:"dials"`
	Warmup  int    `json:"warmup"`
	Address string `json:"leader"`
	// Samples holds every timing, by the figure's name, when --samples asks.
	Samples map[string][]float64 `json:"samples_ms,omitempty"`
}

func main() {
	var (
		stateDir = flag.String("state-dir", "", "the state directory of the member to dial as (required)")
		cluster  = flag.String("cluster", "", "comma-separated member addresses (required)")
		dbName   = flag.String("db", "db.bin", "database name (microcluster's is db.bin)")
		n        = flag.Int("n", 1000, "timed rounds (LEADER, CLUSTER, SELECT each)")
		dials    = flag.Int("dials", 20, "timed new dials")
		warmup   = flag.Int("warmup", 20, "untimed rounds before timing")
		timeout  = flag.Duration("timeout", 120*time.Second, "overall time limit")
		raw      = flag.Bool("samples", false, "print every timing too")
	)
	flag.Parse()
	addrs := splitList(*cluster)
	if *stateDir == "" || len(addrs) == 0 || *n <= 0 || *dials <= 0 || *warmup < 0 || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "memberguard-microcluster-bench: --state-dir and --cluster ADDR[,ADDR...] are required;"+
			" --n and --dials must be > 0")
		os.Exit(2)
	}

	config, err := memberTLS(*stateDir)
	if err != nil {
		fail("%v", err)
	}
	dial := upgradeDial(config)

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	store := client.NewInmemNodeStore()
	infos := make([]client.NodeInfo, len(addrs))
	for i, a := range addrs {
		infos[i].Address = a
	}
	if err := store.Set(ctx, infos); err != nil {
		fail("node store: %v", err)
	}
	cli, err := client.FindLeader(ctx, store, client.WithDialFunc(dial))
	if err != nil {
		fail("find leader: %v", err)
	}
	defer cli.Close()
	leader, err := cli.Leader(ctx)
	if err != nil || leader == nil {
		fail("leader: %v", err)
	}

	drv, err := driver.New(store, driver.WithDialFunc(dial))
	if err != nil {
		fail("driver: %v", err)
	}
	connector, err := drv.OpenConnector(*dbName)
	if err != nil {
		fail("connector: %v", err)
	}
	db := sql.OpenDB(connector)
	defer db.Close()
	conn, err := db.Conn(ctx)
	if err != nil {
		fail("open %s: %v", *dbName, err)
	}
	defer conn.Close()

	ops := []func() error{
		func() error {
			_, err := cli.Leader(ctx)
			return err
		},
		func() error {
			nodes, err := cli.Cluster(ctx)
			if err == nil && len(nodes) == 0 {
				err = errors.New("empty cluster")
			}
			return err
		},
		func() error {
			var (
				id                                   int64
				name, address, certificate, roleText string
			)
			return conn.QueryRowContext(ctx, selectMember, 1).Scan(&id, &name, &address, &certificate, &roleText)
		},
	}
	labels := []string{"leader", "cluster", "select"}
	for i := 0; i < *warmup; i++ {
		for j, op := range ops {
			if err := op(); err != nil {
				fail("%s: %v", labels[j], err)
			}
		}
	}
	samples := make([][]float64, len(ops))
	for i := 0; i < *n; i++ {
		for j, op := range ops {
			elapsed, err := timed(op)
			if err != nil {
				fail("%s: %v", labels[j], err)
			}
			samples[j] = append(samples[j], elapsed)
		}
	}
	var dialled []float64
	for i := 0; i < *dials; i++ {
		elapsed, err := timed(func() error {
			c, err := client.New(ctx, leader.Address, client.WithDialFunc(dial))
			if err != nil {
				return err
			}
			return c.Close()
		})
		if err != nil {
			fail("dial %s: %v", leader.Address, err)
		}
		dialled = append(dialled, elapsed)
	}

	res := result{
		Leader: summary(samples[0]), Cluster: summary(samples[1]), Select: summary(samples[2]), Dial: summary(dialled),
		N: *n, Dials: *dials, Warmup: *warmup, Address: leader.Address,
	}
	if *raw {
		res.Samples = map[string][]float64{
			"leader_ms": samples[0], "cluster_ms": samples[1], "select_ms": samples[2], "dial_ms": dialled,
		}
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}

// memberTLS is TLS as the member in stateDir: its server.crt and server.key
// presented, cluster.crt the one certificate trusted. The peers serve
// cluster.crt itself, so the chain is that one certificate, verified against
// the name it carries (the peers are dialled by address).
func memberTLS(stateDir string) (*tls.Config, error) {
	keyPair, err := tls.LoadX509KeyPair(filepath.Join(stateDir, "server.crt"), filepath.Join(stateDir, "server.key"))
	if err != nil {
		return nil, fmt.Errorf("the member's identity: %w", err)
	}
	clusterCrt := filepath.Join(stateDir, "cluster.crt")
	data, err := os.ReadFile(clusterCrt)
	if err != nil {
		return nil, fmt.Errorf("the cluster certificate: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM certificate", clusterCrt)
	}
	trusted, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", clusterCrt, err)
	}
	if len(trusted.DNSNames) == 0 {
		return nil, fmt.Errorf("%s names no host to verify the members by", clusterCrt)
	}
	roots := x509.NewCertPool()
	roots.AddCert(trusted)
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		RootCAs:      roots,
		ServerName:   trusted.DNSNames[0],
		Certificates: []tls.Certificate{keyPair},
		// The peer admits a member by the certificate it presents, whatever
		// CAs its request names: always present the member's own.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &keyPair, nil },
	}, nil
}

// upgradeDial returns go-dqlite's dial: TLS to address, the upgrade request,
// and the stream handed over once the peer has switched to dqlite.
func upgradeDial(config *tls.Config) client.DialFunc {
	return func(ctx context.Context, address string) (net.Conn, error) {
		dialer := tls.Dialer{Config: config}
		conn, err := dialer.DialContext(ctx, "tcp", address)
		if err != nil {
			return nil, err
		}
		if err := upgrade(ctx, conn, address); err != nil {
			_ = conn.Close()
			return nil, fmt.Errorf("%s: %w", address, err)
		}
		return conn, nil
	}
}

func upgrade(ctx context.Context, conn net.Conn, address string) error {
	// The peer answers only a request whose Host is its own address, as the
	// cluster spells it.
	request, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+address+"/core/internal/database", nil)
	if err != nil {
		return err
	}
	request.Header.Set("Upgrade", "dqlite")
	request.Header.Set("Connection", "Upgrade")
	request.Header.Set("X-Dqlite-Version", "1")
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
		defer func() { _ = conn.SetDeadline(time.Time{}) }()
	}
	if err := request.Write(conn); err != nil {
		return fmt.Errorf("sending the upgrade: %w", err)
	}
	reader := bufio.NewReader(conn)
	response, err := http.ReadResponse(reader, request)
	if err != nil {
		return fmt.Errorf("reading the upgrade's answer: %w", err)
	}
	_ = response.Body.Close()
	if response.StatusCode != http.StatusSwitchingProtocols || response.Header.Get("Upgrade") != "dqlite" {
		return fmt.Errorf("the upgrade was refused: %s", response.Status)
	}
	// dqlite speaks only when spoken to: bytes already read past the 101
	// would be lost to go-dqlite, which reads from conn itself.
	if reader.Buffered() != 0 {
		return fmt.Errorf("%d bytes after the 101, before any request", reader.Buffered())
	}
	return nil
}

func timed(op func() error) (float64, error) {
	start := time.Now()
	err := op()
	return float64(time.Since(start).Nanoseconds()) / 1e6, err
}

// summary takes the median as the middle sample (the mean of the two middle
// ones for an even count) and p99 as the sample at rank round(0.99 (n-1)), as
// the Python side's Figures.of does, so the two columns compare like for like.
func summary(samples []float64) stats {
	sorted := append([]float64(nil), samples...)
	sort.Float64s(sorted)
	n := len(sorted)
	median := sorted[n/2]
	if n%2 == 0 {
		median = (sorted[n/2-1] + sorted[n/2]) / 2
	}
	sum := 0.0
	for _, s := range sorted {
		sum += s
	}
	return stats{
		P50:  round(median),
		P99:  round(sorted[int(0.99*float64(n-1)+0.5)]),
		Min:  round(sorted[0]),
		Mean: round(sum / float64(n)),
		Max:  round(sorted[n-1]),
	}
}

func round(ms float64) float64 { return float64(int64(ms*1e4+0.5)) / 1e4 }

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "memberguard-microcluster-bench: "+format+"\n", a...)
	os.Exit(1)
}

func splitList(s string) []string {
	var out []string
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}
