// Command memberguard-dqlite-node is memberguard's dqlite test node.
//
// It runs one go-dqlite app node (the same machinery as dqlite-demo) with the
// knobs memberguard's tests need: a data dir used as-is, a configurable roles
// adjustment interval, voters/stand-bys counts, optional mutual TLS with the
// node's own certificate that trusts the certificates of a microcluster-style
// truststore directory as it is at each handshake (see loadTLS), a
// machine-readable "ready" line on stdout, and a clean SIGTERM/SIGINT shutdown
// (Handover, then Close, exit 0; a node that is not ready yet skips the
// Handover).
//
// stdout carries exactly one line, "ready id=<decimal id> address=<addr>",
// printed when app.Ready returns. Everything else goes to stderr.
//
// Exit codes: 0 clean stop; 1 a second signal arrived, or Close did not finish
// within --close-timeout; 2 bad flags or the node could not start.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/canonical/go-dqlite/app"
	"github.com/canonical/go-dqlite/client"
	"gopkg.in/yaml.v2"
)

func main() {
	log.SetOutput(os.Stderr)
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	var (
		dbAddr          = flag.String("db", "", "dqlite address HOST:PORT of this node (required)")
		dir             = flag.String("dir", "", "data directory, used as-is (required; created if missing)")
		join            = flag.String("join", "", "comma-separated addresses of existing members to join; empty = bootstrap a new cluster")
		rolesInterval   = flag.Duration("roles-interval", time.Second, "roles adjustment frequency (go-dqlite WithRolesAdjustmentFrequency)")
		voters          = flag.Int("voters", 3, "desired number of voters (odd, >= 3; must be equal on all nodes)")
		standbys        = flag.Int("standbys", 3, "desired number of stand-bys (must be equal on all nodes)")
		tlsCert         = flag.String("tls-cert", "", "PEM certificate of this node (enables TLS; needs --tls-key and --tls-truststore)")
		tlsKey          = flag.String("tls-key", "", "PEM private key of this node")
		tlsTruststore   = flag.String("tls-truststore", "", "truststore directory (<name>.yaml records: name, address, certificate); its certificates are trusted, re-read when it changes")
		handoverTimeout = flag.Duration("handover-timeout", 5*time.Second, "time limit for Handover on stop")
		closeTimeout    = flag.Duration("close-timeout", 10*time.Second, "time limit for Close on stop; exceeded = exit 1")
		netLatency      = flag.Duration("network-latency", 0, "average one-way network latency hint (go-dqlite WithNetworkLatency; scales raft heartbeat/election timeouts); 0 = dqlite's default")
		verbose         = flag.Bool("verbose", false, "log go-dqlite debug/info messages too (default: warnings and errors)")
	)
	flag.Parse()

	if flag.NArg() != 0 {
		fatalf("unexpected arguments: %v", flag.Args())
	}
	if *dbAddr == "" {
		fatalf("--db is required")
	}
	if *dir == "" {
		fatalf("--dir is required")
	}
	if *rolesInterval <= 0 {
		fatalf("--roles-interval must be positive")
	}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		fatalf("create data dir: %v", err)
	}

	minLevel := client.LogWarn
	if *verbose {
		minLevel = client.LogDebug
	}
	logFunc := func(l client.LogLevel, format string, a ...interface{}) {
		if l < minLevel {
			return
		}
		log.Printf("[%s] dqlite: %s", l.String(), fmt.Sprintf(format, a...))
	}

	options := []app.Option{
		app.WithAddress(*dbAddr),
		app.WithRolesAdjustmentFrequency(*rolesInterval),
		app.WithVoters(*voters),
		app.WithStandBys(*standbys),
		app.WithLogFunc(logFunc),
	}
	if *netLatency > 0 {
		options = append(options, app.WithNetworkLatency(*netLatency))
	}
	if cluster := splitList(*join); len(cluster) > 0 {
		options = append(options, app.WithCluster(cluster))
	}
	if *tlsCert != "" || *tlsKey != "" || *tlsTruststore != "" {
		listen, dial, err := loadTLS(*tlsCert, *tlsKey, *tlsTruststore)
		if err != nil {
			fatalf("TLS: %v", err)
		}
		options = append(options, app.WithTLS(listen, dial))
	}

	// Install the signal handler before starting anything, so a signal that
	// arrives during start-up is not lost (and does not kill us uncleanly).
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	node, err := app.New(*dir, options...)
	if err != nil {
		fatalf("start node: %v", err)
	}
	log.Printf("node started: id=%d address=%s dir=%s", node.ID(), node.Address(), *dir)

	readyCtx, cancelReady := context.WithCancel(context.Background())
	readyErr := make(chan error, 1)
	go func() { readyErr <- node.Ready(readyCtx) }()

	var sig os.Signal
	ready := false
	select {
	case sig = <-sigs:
	case err := <-readyErr:
		if err != nil {
			// Only happens if the context is cancelled or the app is
			// closed, neither of which we do before a signal.
			log.Printf("ready: %v", err)
		} else {
			fmt.Fprintf(os.Stdout, "ready id=%d address=%s\n", node.ID(), node.Address())
			os.Stdout.Sync()
			log.Printf("ready")
			ready = true
		}
		sig = <-sigs
	}
	cancelReady()

	// From here on, a second signal means "stop now".
	go func() {
		s := <-sigs
		log.Printf("second signal (%s): exiting immediately", s)
		os.Exit(1)
	}()

	start := time.Now()
	if ready {
		log.Printf("signal %s: handing over (timeout %s)", sig, *handoverTimeout)
		hctx, cancel := context.WithTimeout(context.Background(), *handoverTimeout)
		if err := node.Handover(hctx); err != nil {
			log.Printf("handover failed after %s (continuing with close): %v", time.Since(start).Round(time.Millisecond), err)
		} else {
			log.Printf("handover done in %s", time.Since(start).Round(time.Millisecond))
		}
		cancel()
	} else {
		// Not ready: a brand-new node has not joined or been promoted
		// yet, so it holds no role worth handing over, and Handover
		// would just spend its whole timeout looking for a leader.
		log.Printf("signal %s before ready: skipping handover", sig)
	}

	closed := make(chan error, 1)
	go func() { closed <- node.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			// The node is stopped either way; report but exit 0 so a
			// test can tell "stopped" from "hung".
			log.Printf("close: %v", err)
		}
	case <-time.After(*closeTimeout):
		log.Printf("close did not finish within %s: exiting", *closeTimeout)
		os.Exit(1)
	}
	log.Printf("stopped in %s", time.Since(start).Round(time.Millisecond))
	os.Exit(0)
}

func fatalf(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "memberguard-dqlite-node: "+format+"\n", a...)
	os.Exit(2)
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

// loadTLS builds the listen (server) and dial (client) configurations.
//
// Trust model: each member presents its OWN certificate, both when accepting
// and when dialling (mutual TLS), and trusts the certificates of its
// truststore directory as they are at the time of each handshake, as
// microcluster's dqlite does: a member whose record is written into the
// truststore is accepted from the next handshake on, one whose record is
// removed is refused from then on, without a restart. Connections already
// open are not checked again. A peer is accepted when the certificate it
// presents (its leaf) is byte-for-byte one of the trusted certificates
// (pinning, as for microcluster's self-signed member certificates), or,
// failing that, when its chain verifies against them used as roots, so a real
// CA in the truststore also works.
//
// Why not Go's standard verification: go-dqlite dials peers by "IP:port" and,
// when the dial config has no ServerName, uses the IP as ServerName
// (app/dial.go, client.DialFuncWithTLS). Member certificates carry a DNS SAN
// equal to the member name, not the IP, so hostname checking would fail; and a
// single fixed ServerName (as app.SimpleDialTLSConfig does with the local
// cert's first DNS name) only works if every member shares that name. Which
// member sits at which address is raft's business, not TLS's: TLS only has to
// prove "the peer holds the key of a trusted member". So the dial side sets
// InsecureSkipVerify (which only disables the built-in chain+hostname check)
// and does the check itself in VerifyPeerCertificate; the listen side uses
// RequireAnyClientCert with the same check. The check rejects an expired or
// not-yet-valid leaf, and a connection without a certificate.
func loadTLS(certFile, keyFile, truststoreDir string) (listen, dial *tls.Config, err error) {
	if certFile == "" || keyFile == "" || truststoreDir == "" {
		return nil, nil, errors.New("--tls-cert, --tls-key and --tls-truststore must all be given")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("load key pair: %w", err)
	}
	store := &truststore{dir: truststoreDir}
	verify := func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
		trusted, pool, err := store.current()
		if err != nil {
			return err
		}
		return verifyPeer(rawCerts, trusted, pool)
	}
	listen = &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAnyClientCert,
		// Must not be nil: go-dqlite's proxy chooses tls.Server over
		// tls.Client by ClientCAs != nil (app/proxy.go). With
		// RequireAnyClientCert it verifies nothing, it is only the
		// acceptable-CA hint of the certificate request, so it stays
		// empty rather than a copy of the truststore that would go stale:
		// an empty hint asks for any certificate.
		ClientCAs:             x509.NewCertPool(),
		VerifyPeerCertificate: verify,
	}
	dial = &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // replaced by VerifyPeerCertificate, see above
		// Always present our own certificate, whatever the server's
		// acceptable-CA hint says; the server decides.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &cert, nil
		},
		VerifyPeerCertificate: verify,
	}
	return listen, dial, nil
}

// truststore is the set of certificates a node trusts: those of the records in
// its truststore directory, one <name>.yaml per member with the keys name,
// address and certificate (PEM), as microcluster keeps it. A record counts
// when all three are there and the certificate parses, the rule of
// memberguard's reader (coordinator/agent/truststore.py), so that the records
// an agent reports are what its engine trusts; other files are skipped. A
// directory that cannot be read trusts nobody until it can be read again:
// the handshake fails, the node goes on.
//
// Handshakes are rare (go-dqlite keeps its connections), yet the directory is
// read again only when it changed since the last one: an unchanged truststore
// costs a stat per file.
type truststore struct {
	dir string

	mu    sync.Mutex // handshakes run concurrently, one goroutine per connection
	stamp string     // the directory as it looked when certs was read; "" = not read
	certs []*x509.Certificate
	pool  *x509.CertPool
}

type truststoreRecord struct {
	Name        string `yaml:"name"`
	Address     string `yaml:"address"`
	Certificate string `yaml:"certificate"`
}

// current returns the trusted certificates, as a list (to pin leaves) and as
// a pool (roots for chains).
func (t *truststore) current() ([]*x509.Certificate, *x509.CertPool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	stamp, files, err := t.look()
	if err != nil {
		t.stamp, t.certs, t.pool = "", nil, nil
		return nil, nil, fmt.Errorf("truststore unreadable, trusting nobody: %w", err)
	}
	if stamp != t.stamp {
		t.certs, t.pool = readRecords(files)
		t.stamp = stamp
		log.Printf("truststore %s: %d trusted certificate(s)", t.dir, len(t.certs))
	}
	return t.certs, t.pool, nil
}

// look lists the directory's *.yaml files and describes the listing. The
// directory's mtime moves when a record is added, removed, or replaced by a
// rename (how microcluster and memberguard write records); a file's inode
// tells a replacement made within one tick of the coarse mtime clock, its
// mtime and size a file rewritten in place. A file changed between this look
// and the read that follows is read again at the next handshake, since its
// stat will then differ from the stamp.
func (t *truststore) look() (string, []string, error) {
	dirInfo, err := os.Stat(t.dir)
	if err != nil {
		return "", nil, err
	}
	entries, err := os.ReadDir(t.dir) // sorted by name
	if err != nil {
		return "", nil, err
	}
	var stamp strings.Builder
	fmt.Fprintf(&stamp, "%d", dirInfo.ModTime().UnixNano())
	var files []string
	for _, entry := range entries {
		if !strings.HasSuffix(entry.Name(), ".yaml") {
			continue
		}
		path := filepath.Join(t.dir, entry.Name())
		info, err := os.Stat(path) // follows a symlink, as the Python reader does
		if err != nil || !info.Mode().IsRegular() {
			continue // removed since the listing, or not a record
		}
		var inode uint64
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			inode = st.Ino
		}
		fmt.Fprintf(&stamp, "|%s %d %d %d", entry.Name(), inode, info.ModTime().UnixNano(), info.Size())
		files = append(files, path)
	}
	return stamp.String(), files, nil
}

func readRecords(files []string) ([]*x509.Certificate, *x509.CertPool) {
	var certs []*x509.Certificate
	pool := x509.NewCertPool()
	for _, path := range files {
		c, err := readRecord(path)
		if err != nil {
			log.Printf("truststore: not trusting %s: %v", path, err)
			continue
		}
		certs = append(certs, c)
		pool.AddCert(c)
	}
	return certs, pool
}

func readRecord(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var record truststoreRecord
	if err := yaml.Unmarshal(data, &record); err != nil {
		return nil, fmt.Errorf("not a YAML mapping of a record: %w", err)
	}
	if record.Name == "" || record.Address == "" || record.Certificate == "" {
		return nil, errors.New("name, address or certificate missing or empty")
	}
	block, _ := pem.Decode([]byte(record.Certificate))
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("certificate is not a PEM certificate")
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("certificate does not parse: %w", err)
	}
	return c, nil
}

func verifyPeer(rawCerts [][]byte, trusted []*x509.Certificate, pool *x509.CertPool) error {
	if len(rawCerts) == 0 {
		return errors.New("peer presented no certificate")
	}
	leaf, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return fmt.Errorf("parse peer certificate: %w", err)
	}
	now := time.Now()
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return fmt.Errorf("peer certificate %q is not valid at %s", leaf.Subject, now.Format(time.RFC3339))
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
	_, err = leaf.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("peer certificate %q is not in the truststore: %w", leaf.Subject, err)
	}
	return nil
}
