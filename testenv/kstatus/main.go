// kstatus: what sigs.k8s.io/cli-utils' kstatus (the health library Flux and kpt use) computes
// for each object. Reads a JSON array of objects on stdin, writes a JSON array of
// {"status", "message"} (status: InProgress, Current, Failed, Terminating, NotFound, Unknown).
// Built and cached by `scripts/testenv build`; used by tests/unit/test_health.py.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	var objects []json.RawMessage
	if err := json.NewDecoder(os.Stdin).Decode(&objects); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: stdin must be a JSON array of objects:", err)
		os.Exit(2)
	}
	out := make([]verdict, 0, len(objects))
	for _, raw := range objects {
		obj := &unstructured.Unstructured{}
		if err := obj.UnmarshalJSON(raw); err != nil { // integers stay int64, as from the API server
			out = append(out, verdict{Status: "Error", Message: err.Error()})
			continue
		}
		res, err := status.Compute(obj)
		if err != nil {
			out = append(out, verdict{Status: "Error", Message: err.Error()})
			continue
		}
		out = append(out, verdict{Status: res.Status.String(), Message: res.Message})
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}
