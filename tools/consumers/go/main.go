// Command consume prints Kensa inspection events from Kafka as JSON lines, de-duplicated on
// event_id (Kensa delivers at least once). Protobuf types come from proto/kensa/v1/event.proto:
//
//	protoc -I ../../../proto --go_out=. --go_opt=Mkensa/v1/event.proto=./kensav1 kensa/v1/event.proto
//	go mod init example.com/kensa-consume && go mod tidy
//	go run . -brokers 127.0.0.1:9092 -topic kensa.results
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	kensav1 "example.com/kensa-consume/kensav1"
)

func main() {
	brokers := flag.String("brokers", "127.0.0.1:9092", "bootstrap servers")
	topic := flag.String("topic", "kensa.results", "topic")
	max := flag.Int("max", 0, "stop after this many distinct events")
	flag.Parse()
	cl, err := kgo.NewClient(kgo.SeedBrokers(*brokers), kgo.ConsumeTopics(*topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer cl.Close()
	seen := map[string]bool{}
	for *max == 0 || len(seen) < *max {
		fetches := cl.PollFetches(context.Background())
		fetches.EachRecord(func(r *kgo.Record) {
			payload := r.Value
			if len(payload) >= 6 && payload[0] == 0 { // Schema Registry framing: magic, id, index [0]
				payload = payload[6:]
			}
			var ev kensav1.InspectionEvent
			if err := proto.Unmarshal(payload, &ev); err != nil {
				fmt.Fprintln(os.Stderr, "undecodable event:", err)
				return
			}
			if seen[ev.EventId] {
				return
			}
			seen[ev.EventId] = true
			ev.MaskPng = nil
			b, _ := protojson.Marshal(&ev)
			var m map[string]any
			_ = json.Unmarshal(b, &m)
			m["key"] = string(r.Key)
			out, _ := json.Marshal(m)
			fmt.Println(string(out))
		})
	}
}
