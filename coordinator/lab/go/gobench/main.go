// Command memberguard-dqlite-bench is a latency baseline measured with
// go-dqlite's own client, to compare memberguard's native client against.
//
// It finds the leader among --cluster, makes sure table
// bench(id INTEGER PRIMARY KEY, v TEXT) exists in database --db with a row
// id=1, then times --n rounds of, in turn (as the native client's bench does):
//
//   - cluster: client.Cluster() on one kept protocol connection to the leader
//     (one CLUSTER request per call);
//   - select:  "SELECT v FROM bench WHERE id = 1" on one kept database
//     connection (database/sql pinned with DB.Conn; go-dqlite's driver sends
//     one QUERY_SQL per call, no prepare step), reading the row to the end.
//
// It prints one JSON object on stdout:
//
//	{"cluster_ms":{"p50":..,"p99":..},"select_ms":{"p50":..,"p99":..},"n":N}
//
// plus the leader address, min/mean/max and the warm-up count; with
// --samples, every timing too ("samples_ms": {"cluster_ms": [..], ..}), so
// that runs alternating with the native client's can be pooled. Errors go to
// stderr with exit status 1 (2 for bad flags).
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/canonical/go-dqlite/client"
	"github.com/canonical/go-dqlite/driver"
)

type stats struct {
	P50  float64 `json:"p50"`
	P99  float64 `json:"p99"`
	Min  float64 `json:"min"`
	Mean float64 `json:"mean"`
	Max  float64 `json:"max"`
}

type result struct {
	Cluster stats  `json:"cluster_ms"`
	Select  stats  `json:"select_ms"`
	N       int    `json:"n"`
	Warmup  int    `json:"warmup"`
	Leader  string `json:"leader"`
	TLS     bool   `json:"tls"`
	// Samples holds every timing, by the figure's name, when --samples asks.
	Samples map[string][]float64 `json:"samples_ms,omitempty"`
}

func main() {
	var (
		cluster = flag.String("cluster", "", "comma-separated dqlite addresses (required)")
		dbName  = flag.String("db", "memberguard", "database name")
		n       = flag.Int("n", 1000, "timed calls per operation")
		warmup  = flag.Int("warmup", 20, "untimed calls per operation before timing")
		timeout = flag.Duration("timeout", 60*time.Second, "overall time limit")
		tlsCert = flag.String("tls-cert", "", "PEM client certificate (enables TLS; needs --tls-key and --tls-ca)")
		tlsKey  = flag.String("tls-key", "", "PEM client private key")
		tlsCA   = flag.String("tls-ca", "", "PEM bundle of trusted member certificates or CAs")
		raw     = flag.Bool("samples", false, "print every timing too")
	)
	flag.Parse()
	addrs := splitList(*cluster)
	if len(addrs) == 0 || *n <= 0 || *warmup < 0 || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "memberguard-dqlite-bench: --cluster ADDR[,ADDR...] is required and --n must be > 0")
		os.Exit(2)
	}

	dial := client.DefaultDialFunc
	useTLS := *tlsCert != "" || *tlsKey != "" || *tlsCA != ""
	if useTLS {
		cfg, err := dialTLS(*tlsCert, *tlsKey, *tlsCA)
		if err != nil {
			fail("TLS: %v", err)
		}
		dial = client.DialFuncWithTLS(client.DefaultDialFunc, cfg)
	}

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
	if err != nil {
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
	conn, err := db.Conn(ctx) // the one kept connection for the SELECTs
	if err != nil {
		fail("open %s: %v", *dbName, err)
	}
	defer conn.Close()

	if _, err := conn.ExecContext(ctx, "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, v TEXT)"); err != nil {
		fail("create table: %v", err)
	}
	if _, err := conn.ExecContext(ctx, "INSERT OR IGNORE INTO bench (id, v) VALUES (1, 'memberguard')"); err != nil {
		fail("insert row: %v", err)
	}

	clusterOp := func() error {
		nodes, err := cli.Cluster(ctx)
		if err == nil && len(nodes) == 0 {
			err = errors.New("empty cluster")
		}
		return err
	}
	selectOp := func() error {
		var v string
		return conn.QueryRowContext(ctx, "SELECT v FROM bench WHERE id = 1").Scan(&v)
	}

	res := result{N: *n, Warmup: *warmup, TLS: useTLS}
	if leader != nil {
		res.Leader = leader.Address
	}
	samples, err := measure([]func() error{clusterOp, selectOp}, *n, *warmup)
	if err != nil {
		fail("%v", err)
	}
	res.Cluster, res.Select = summary(samples[0]), summary(samples[1])
	if *raw {
		res.Samples = map[string][]float64{"cluster_ms": samples[0], "select_ms": samples[1]}
	}

	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}

// measure times n rounds of ops, each op once a round in order, after warmup
// untimed rounds; the timings of each op, in milliseconds, in the order taken.
func measure(ops []func() error, n, warmup int) ([][]float64, error) {
	for i := 0; i < warmup; i++ {
		for _, op := range ops {
			if err := op(); err != nil {
				return nil, err
			}
		}
	}
	samples := make([][]float64, len(ops))
	for i := 0; i < n; i++ {
		for j, op := range ops {
			start := time.Now()
			if err := op(); err != nil {
				return nil, err
			}
			samples[j] = append(samples[j], float64(time.Since(start).Nanoseconds())/1e6)
		}
	}
	return samples, nil
}

func summary(samples []float64) stats {
	sorted := append([]float64(nil), samples...)
	sort.Float64s(sorted)
	sum := 0.0
	for _, s := range sorted {
		sum += s
	}
	n := len(sorted)
	return stats{
		P50:  round(percentile(sorted, 50)),
		P99:  round(percentile(sorted, 99)),
		Min:  round(sorted[0]),
		Mean: round(sum / float64(n)),
		Max:  round(sorted[n-1]),
	}
}

// percentile uses the nearest-rank method on sorted samples.
func percentile(sorted []float64, p float64) float64 {
	rank := int(p/100*float64(len(sorted))+0.999999999) - 1
	if rank < 0 {
		rank = 0
	}
	if rank >= len(sorted) {
		rank = len(sorted) - 1
	}
	return sorted[rank]
}

func round(ms float64) float64 { return float64(int64(ms*1e4+0.5)) / 1e4 }

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "memberguard-dqlite-bench: "+format+"\n", a...)
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

// dialTLS builds the client-side config. It mirrors the test node's trust
// model (see testnode/main.go, loadTLS): present our own certificate, and
// accept a server whose leaf certificate is one of the bundle's certificates
// (or chains to one), without hostname checks, because go-dqlite dials by IP
// while member certificates name the member.
func dialTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	if certFile == "" || keyFile == "" || caFile == "" {
		return nil, errors.New("--tls-cert, --tls-key and --tls-ca must all be given")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load key pair: %w", err)
	}
	data, err := ioutil.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("read CA bundle: %w", err)
	}
	var trusted []*x509.Certificate
	pool := x509.NewCertPool()
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate in %s: %w", caFile, err)
		}
		trusted = append(trusted, c)
		pool.AddCert(c)
	}
	if len(trusted) == 0 {
		return nil, fmt.Errorf("no certificates in %s", caFile)
	}
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // replaced by VerifyPeerCertificate
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &cert, nil
		},
		VerifyPeerCertificate: func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
			if len(rawCerts) == 0 {
				return errors.New("server presented no certificate")
			}
			leaf, err := x509.ParseCertificate(rawCerts[0])
			if err != nil {
				return err
			}
			now := time.Now()
			if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
				return fmt.Errorf("server certificate %q is not valid now", leaf.Subject)
			}
			for _, c := range trusted {
				if bytes.Equal(c.Raw, leaf.Raw) {
					return nil
				}
			}
			inter := x509.NewCertPool()
			for _, raw := range rawCerts[1:] {
				if c, err := x509.ParseCertificate(raw); err == nil {
					inter.AddCert(c)
				}
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: now,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
				return fmt.Errorf("server certificate %q is not trusted: %w", leaf.Subject, err)
			}
			return nil
		},
	}, nil
}
