// Command memberguard-go-client proves the memberguard.v1 contract from a second language: it is built against Go
// code generated from protos/ (tests/test_go_client.py generates it, with no M flags: the protos' go_package says
// where each file goes) and talks to a coordinator over mutual TLS as an operator would.
//
// It makes two calls and prints one JSON object on stdout:
//
//	{"check":   {"fingerprint": "...", "discrepancies": 1},
//	 "refusal": {"code": 9, "code_name": "FailedPrecondition", "message": "...",
//	             "error_info": {...}, "violations": [{...}], "diff": {...}, "other_details": []}}
//
// CheckMembership first; then a GuardedOperation issuing a token, which the guard must refuse because the membership
// is not consistent. The refusal's google.rpc.Status details are decoded by type (google.rpc.ErrorInfo,
// google.rpc.PreconditionFailure, memberguard.v1.MembershipDiff) and printed in the proto3 JSON mapping with the
// protos' field names, as grpcurl prints them, so a test in any language can compare them with its own client's.
// A detail of any other type, or a second detail of one type, is listed by type URL in other_details: the contract
// says each type comes at most once.
//
// Exit status: 0 when the check answered and the operation was refused (whatever the status); 1 when the operation
// was accepted (the object then has "accepted" instead of "refusal"); 2 for bad flags, unreadable certificates or a
// failed CheckMembership, with the reason on stderr.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	memberguardv1 "github.com/memberguard/memberguard/gen/go/memberguard/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// The JSON style of every message printed: the protos' own field names, as grpcurl and the Python client print them.
var jsonStyle = protojson.MarshalOptions{UseProtoNames: true}

type checkResult struct {
	Fingerprint   string `json:"fingerprint"`
	Discrepancies int    `json:"discrepancies"`
}

type refusal struct {
	Code     uint32 `json:"code"`
	CodeName string `json:"code_name"`
	Message  string `json:"message"`
	// Absent details stay null, so a test can tell "not sent" from "sent empty".
	ErrorInfo    json.RawMessage   `json:"error_info"`
	Violations   []json.RawMessage `json:"violations"`
	Diff         json.RawMessage   `json:"diff"`
	OtherDetails []string          `json:"other_details"`
}

type report struct {
	Check    checkResult     `json:"check"`
	Refusal  *refusal        `json:"refusal,omitempty"`
	Accepted json.RawMessage `json:"accepted,omitempty"`
}

func main() {
	address := flag.String("address", "", "the coordinator's address, host:port")
	caFile := flag.String("ca", "", "PEM file of the CA the coordinator's certificate must chain to")
	serverName := flag.String("server-name", "", "the name the coordinator's certificate must carry")
	certFile := flag.String("cert", "", "PEM file of the operator's certificate")
	keyFile := flag.String("key", "", "PEM file of the operator's key")
	tokenName := flag.String("token-name", "n9", "the member name the refused issue_token operation asks a token for")
	requestID := flag.String("request-id", "go-client-1", "the refused operation's request_id")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of each call")
	flag.Parse()
	if *address == "" || *caFile == "" || *serverName == "" || *certFile == "" || *keyFile == "" {
		fail("-address, -ca, -server-name, -cert and -key are required")
	}
	if flag.NArg() != 0 {
		fail(fmt.Sprintf("unexpected arguments: %v", flag.Args()))
	}

	transport, err := mutualTLS(*caFile, *serverName, *certFile, *keyFile)
	if err != nil {
		fail(err.Error())
	}
	connection, err := grpc.NewClient(*address, grpc.WithTransportCredentials(transport))
	if err != nil {
		fail(fmt.Sprintf("cannot dial %s: %v", *address, err))
	}
	defer connection.Close()
	coordinator := memberguardv1.NewCoordinatorServiceClient(connection)

	var out report
	checked, err := call(*timeout, func(ctx context.Context) (*memberguardv1.CheckMembershipResponse, error) {
		return coordinator.CheckMembership(ctx, &memberguardv1.CheckMembershipRequest{})
	})
	if err != nil {
		fail(fmt.Sprintf("CheckMembership failed: %v", err))
	}
	out.Check = checkResult{
		Fingerprint:   checked.GetDiff().GetFingerprint(),
		Discrepancies: len(checked.GetDiff().GetDiscrepancies()),
	}

	request := &memberguardv1.GuardedOperationRequest{
		RequestId: *requestID,
		Operation: &memberguardv1.GuardedOperationRequest_IssueToken{
			IssueToken: &memberguardv1.IssueTokenOperation{Name: *tokenName},
		},
	}
	accepted, err := call(*timeout, func(ctx context.Context) (*memberguardv1.GuardedOperationResponse, error) {
		return coordinator.GuardedOperation(ctx, request)
	})
	exit := 0
	if err == nil {
		out.Accepted = marshal(accepted.GetOperation())
		exit = 1
	} else {
		out.Refusal = decode(err)
	}
	encoded, err := json.Marshal(out)
	if err != nil {
		fail(fmt.Sprintf("cannot encode the report: %v", err))
	}
	fmt.Println(string(encoded))
	os.Exit(exit)
}

// mutualTLS trusts only the lab's CA, checks the coordinator's name and presents the operator's certificate: the
// coordinator maps that certificate's fingerprint to the operator role.
func mutualTLS(caFile, serverName, certFile, keyFile string) (credentials.TransportCredentials, error) {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("cannot read the CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("the CA file holds no PEM certificate")
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("cannot load the operator's certificate and key: %w", err)
	}
	return credentials.NewTLS(&tls.Config{
		RootCAs:      roots,
		ServerName:   serverName,
		Certificates: []tls.Certificate{pair},
		MinVersion:   tls.VersionTLS12,
	}), nil
}

func call[T any](timeout time.Duration, rpc func(context.Context) (T, error)) (T, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return rpc(ctx)
}

// decode turns a failed call's status into the refusal printed, each detail by its type.
func decode(err error) *refusal {
	// status.Convert keeps a status the server sent as it is; an error without one (the connection broke) becomes
	// UNKNOWN with no details, which a test sees as such.
	refused := status.Convert(err)
	out := &refusal{
		Code:         uint32(refused.Code()),
		CodeName:     refused.Code().String(),
		Message:      refused.Message(),
		Violations:   []json.RawMessage{},
		OtherDetails: []string{},
	}
	seen := map[string]bool{}
	for _, detail := range refused.Proto().GetDetails() {
		if seen[detail.GetTypeUrl()] {
			out.OtherDetails = append(out.OtherDetails, detail.GetTypeUrl())
			continue
		}
		seen[detail.GetTypeUrl()] = true
		decoded, err := detail.UnmarshalNew()
		if err != nil {
			// The type is not linked into this binary: not one the contract names.
			out.OtherDetails = append(out.OtherDetails, detail.GetTypeUrl())
			continue
		}
		switch message := decoded.(type) {
		case *errdetails.ErrorInfo:
			out.ErrorInfo = marshal(message)
		case *errdetails.PreconditionFailure:
			for _, violation := range message.GetViolations() {
				out.Violations = append(out.Violations, marshal(violation))
			}
		case *memberguardv1.MembershipDiff:
			out.Diff = marshal(message)
		default:
			out.OtherDetails = append(out.OtherDetails, detail.GetTypeUrl())
		}
	}
	return out
}

func marshal(message proto.Message) json.RawMessage {
	encoded, err := jsonStyle.Marshal(message)
	if err != nil {
		fail(fmt.Sprintf("cannot encode %s as JSON: %v", message.ProtoReflect().Descriptor().FullName(), err))
	}
	return encoded
}

func fail(reason string) {
	fmt.Fprintln(os.Stderr, "memberguard-go-client:", reason)
	os.Exit(2)
}
